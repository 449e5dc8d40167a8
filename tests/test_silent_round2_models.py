"""No silent failures, round two (issue 21), items 8-10: GGUF metadata, generation arguments, `wrap`'s params_argnum.

Truths:
- GGUF: a tiny llama file written here with gguf's GGUFWriter; a refusal must be a
  ValueError (OSError for the file system) naming the metadata key or tensor and the file,
  raised before any tensor is dequantised (`gguf.quants.dequantize` is counted); the same
  file with the fault removed loads, so each refusal is about the fault alone.
- generation: an argument that is accepted gives exactly the tokens of its canonical
  spelling (np.float32(1.5) as 1.5, rng=42 as jax.random.key(42)); one that is refused
  names the argument.
- wrap: the adapted tree at another position than `params_argnum` raises the TypeError the
  docstring promises, naming `params_argnum`; at the right position the result is the
  merged model's.
"""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import LlamaConfig

import svft_jax
import svft_jax.models as svft_models
from svft_jax.models import hf
from svft_jax.strategies import wrap
from tests.stack import FLAX_MODELS, FLAX_MODELS_REASON, needs_flax_models

# ---- GGUF ----------------------------------------------------------------------------------------

TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *"abcdefgh ", "ab", "cd"]
HIDDEN, FFN = 16, 24


def write_gguf(path, *, heads=4, kv_heads=2, eos=2, float64_tensor=None):
    """A random one-layer llama GGUF (F32 tensors, `float64_tensor` stored as F64: a type gguf cannot dequantise)."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    writer.add_token_merges(["a b", "c d"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(0)
    head_dim = HIDDEN // max(heads, 1)
    kv = max(kv_heads, 1) * head_dim
    tensors = {
        "token_embd.weight": (len(TOKENS), HIDDEN), "output_norm.weight": (HIDDEN,),
        "blk.0.attn_norm.weight": (HIDDEN,), "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (HIDDEN, HIDDEN), "blk.0.attn_k.weight": (kv, HIDDEN),
        "blk.0.attn_v.weight": (kv, HIDDEN), "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
        "blk.0.ffn_gate.weight": (FFN, HIDDEN), "blk.0.ffn_up.weight": (FFN, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, FFN),
    }
    for name, shape in tensors.items():
        dtype = np.float64 if name == float64_tensor else np.float32
        writer.add_tensor(name, (0.3 * rng.standard_normal(shape)).astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def dequantized(monkeypatch):
    """The number of tensors dequantised so far (gguf.quants.dequantize calls)."""
    calls = []
    original = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, qtype: calls.append(qtype) or original(data, qtype))
    return calls


@needs_flax_models
def test_gguf_control_file_loads(tmp_path, dequantized):
    """The writer's file without a fault loads: model config ids, padding id, tokenizer eos."""
    path = write_gguf(tmp_path / "ok.gguf")
    model, params = svft_models.load_pretrained(str(path))
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    # The pad id is stored under tokenizer.ggml.padding_token_id (gguf's Keys.Tokenizer.PAD_ID).
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 0)
    assert len(dequantized) == 11
    assert svft_models.load_gguf_tokenizer(path).eos_token_id == 2


@pytest.mark.parametrize(("heads", "kv_heads", "key"), [
    (0, 2, "llama.attention.head_count"),
    (4, 0, "llama.attention.head_count_kv"),
    (4, 3, "llama.attention.head_count_kv"),
    (2, 4, "llama.attention.head_count_kv"),
])
@pytest.mark.parametrize("load", [pytest.param(svft_models.load_pretrained, marks=needs_flax_models, id="load_pretrained"),
                                  pytest.param(svft_models.gguf_config, id="gguf_config")])
def test_gguf_bad_head_counts_refused_before_any_tensor(tmp_path, dequantized, heads, kv_heads, key, load):
    path = write_gguf(tmp_path / "heads.gguf", heads=heads, kv_heads=kv_heads)
    with pytest.raises(ValueError, match=key) as err:
        load(str(path))
    assert "heads.gguf" in str(err.value)
    assert dequantized == []


@needs_flax_models
def test_gguf_eos_outside_vocabulary_refused(tmp_path, dequantized):
    path = write_gguf(tmp_path / "eos.gguf", eos=len(TOKENS))
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.eos_token_id = 14 .*\[0, 14\)") as err:
        svft_models.load_pretrained(str(path))
    assert "eos.gguf" in str(err.value) and "eos_token_id=" in str(err.value)  # the override that fixes it
    assert dequantized == []
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.eos_token_id = 14") as err:
        svft_models.load_gguf_tokenizer(path)
    assert "eos.gguf" in str(err.value)
    # The config override the message offers is honoured (and range-checked itself).
    assert svft_models.gguf_config(path, eos_token_id=2).eos_token_id == 2
    with pytest.raises(ValueError, match="eos_token_id"):
        svft_models.gguf_config(path, eos_token_id=99)


@needs_flax_models
def test_gguf_unsupported_quantisation_names_tensor_and_file(tmp_path, dequantized):
    path = write_gguf(tmp_path / "f64.gguf", float64_tensor="blk.0.ffn_down.weight")  # the last tensor
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight.*F64") as err:
        svft_models.load_pretrained(str(path))
    assert "f64.gguf" in str(err.value)
    assert dequantized == []  # checked before the ten readable tensors were dequantised


@needs_flax_models
def test_gguf_folder_passed_as_file(tmp_path):
    write_gguf(tmp_path / "model.gguf")
    folder = tmp_path / "weights.gguf"  # a folder whose name load_pretrained routes to the GGUF loader
    folder.mkdir()
    for call in (svft_models.load_pretrained, svft_models.load_gguf, svft_models.gguf_config,
                 svft_models.load_gguf_tokenizer):
        with pytest.raises(IsADirectoryError, match="is a folder") as err:
            call(str(folder))
        assert "weights.gguf" in str(err.value)
    with pytest.raises(IsADirectoryError, match="model.gguf"):  # the file inside is named
        svft_models.load_gguf(tmp_path)


# ---- generation ----------------------------------------------------------------------------------

CONFIG = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True,
                     eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def tiny():
    if not FLAX_MODELS:
        pytest.skip(FLAX_MODELS_REASON)
    svft_models.honour_rope_theta()
    model = hf.FlaxLlamaForCausalLMTied(CONFIG, _do_init=False)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: (0.7 * rng.standard_normal(s.shape)).astype(np.float32),
                                    model.params_shape_tree)
    return model, params


def sample(model, params, **kwargs):
    kwargs = {"max_new_tokens": 4, "stop_token_id": (), "temperature": 1.5, "rng": jax.random.key(7)} | kwargs
    return svft_models.generate(model, params, [[5, 9, 11]], **kwargs).tokens


def test_generate_nan_or_infinite_temperature_refused(tiny):
    model, params = tiny
    for bad in (float("nan"), np.float32("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            svft_models.generate(model, params, [[5]], max_new_tokens=2, temperature=bad, top_k=3,
                                 rng=jax.random.key(0))


def test_generate_numpy_and_jax_scalar_settings_equal_python_floats(tiny):
    model, params = tiny
    want = sample(model, params, top_p=0.9, top_k=5)
    for temperature, top_p, top_k in ((np.float32(1.5), np.float64(0.9), np.int64(5)),
                                      (jnp.float32(1.5), jnp.asarray(0.9), jnp.int32(5))):
        np.testing.assert_array_equal(sample(model, params, temperature=temperature, top_p=top_p, top_k=top_k), want)
    with pytest.raises(TypeError, match="temperature"):
        sample(model, params, temperature="1.5")
    with pytest.raises(TypeError, match="top_p"):
        sample(model, params, top_p=np.array([0.9, 0.8]))


@pytest.mark.parametrize(("prompts", "match"), [
    ("The capital of France is", "generate_text"),
    (["The capital of France is"], "generate_text"),
    ([5, 9, 11], r"\[\[5, 9, 11\]\]"),
    (np.array([5, 9, 11]), r"\(B, T\)"),
])
def test_generate_text_or_flat_prompts_refused(tiny, prompts, match):
    model, params = tiny
    with pytest.raises(TypeError, match=match):
        svft_models.generate(model, params, prompts, max_new_tokens=2)


def test_generate_bad_pad_token_id_is_blamed(tiny):
    model, params = tiny
    for bad in (99, -1):
        with pytest.raises(ValueError, match="pad_token_id") as err:
            svft_models.generate(model, params, [[5, 9], [4]], max_new_tokens=2, pad_token_id=bad)
        assert "prompt" not in str(err.value)
    with pytest.raises(TypeError, match="pad_token_id"):
        svft_models.generate(model, params, [[5, 9], [4]], max_new_tokens=2, pad_token_id=1.0)
    bad_config = hf.FlaxLlamaForCausalLMTied(LlamaConfig(**(CONFIG.to_dict() | {"pad_token_id": 48})), _do_init=False)
    with pytest.raises(ValueError, match=r"config\.pad_token_id = 48"):
        svft_models.generate(bad_config, params, [[5, 9], [4]], max_new_tokens=2)


def test_generate_float_token_ids_refused(tiny):
    model, params = tiny
    with pytest.raises(TypeError, match="integer"):
        svft_models.generate(model, params, [[5.7, 9.2]], max_new_tokens=2)
    with pytest.raises(TypeError, match="integer"):
        svft_models.generate(model, params, np.array([[5.7, 9.2]]), attention_mask=np.ones((1, 2)), max_new_tokens=2)
    with pytest.raises(TypeError, match="integer"):
        svft_models.generate(model, params, [[True, False]], max_new_tokens=2)


def test_generate_int_rng_is_a_seed(tiny):
    model, params = tiny
    np.testing.assert_array_equal(sample(model, params, rng=42), sample(model, params, rng=jax.random.key(42)))
    np.testing.assert_array_equal(sample(model, params, rng=np.int64(42)), sample(model, params, rng=42))
    assert not np.array_equal(sample(model, params, rng=43), sample(model, params, rng=42))  # the seed is used
    for bad in ("42", 4.2, jax.random.split(jax.random.key(0), 2)):
        with pytest.raises(TypeError, match="rng"):
            sample(model, params, rng=bad)


# ---- wrap ----------------------------------------------------------------------------------------

def test_wrap_adapted_tree_at_another_argument_names_params_argnum():
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)}}
    adapted = svft_jax.apply(params, "plain", svd_backend="numpy")
    x = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)

    def apply_fn(inputs, tree):
        return inputs @ tree["dense"]["kernel"]

    with pytest.raises(TypeError, match=r"params_argnum=0.*positional argument 1.*params_argnum=1"):
        wrap(apply_fn)(x, adapted)
    with pytest.raises(TypeError, match="params_argnum"):
        wrap(apply_fn).plan(x, adapted)
    with pytest.raises(TypeError, match=r"params_argname='tree'.*positional argument 0"):
        wrap(apply_fn, params_argname="tree")(adapted, tree=x)
    want = x @ svft_jax.merge(adapted)["dense"]["kernel"]
    np.testing.assert_allclose(wrap(apply_fn, params_argnum=1)(x, adapted), want, rtol=1e-5, atol=1e-5)
    # Plain (unadapted) params at params_argnum still pass through.
    np.testing.assert_allclose(wrap(apply_fn, params_argnum=1)(x, params), x @ params["dense"]["kernel"], rtol=1e-6)
