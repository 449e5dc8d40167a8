"""A tiny random Llama written as a GGUF file, and the llama.cpp forward in float64 numpy.

The truth for every GGUF loader (`svft_jax.models.load_gguf` → FlaxLlama,
`svft_jax.models.load_gguf_tunix` → Tunix Llama3): logits computed straight from the tensors as
stored in the file — (out, in) rows, Q/K rows in llama.cpp's permuted order — with llama.cpp's
adjacent-pair RoPE (x[2i], x[2i+1]) rotated by p·θ^(-2i/d), grouped-query heads (head h reads
KV head h // (n_head / n_kv_head)), SwiGLU and the tied (or own) head. No loader code is used.
"""

import gguf
import numpy as np
from tokenizers import pre_tokenizers

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


