"""Model builders shared by the tasks and the benchmarks (Hugging Face Flax classes).

- `init_tiny(model_class, config, input_shape)`: a random model initialised in ONE jitted call.
- `tiny_bert_classifier(...)`: the driver's built-in demo model.
- `run_adapted(model)`, `EXECUTION`: the harness's one execution path (the model on the adapted
  tree through `svft_jax.wrap(..., "auto", strict=True)`, never a merged copy) and its label.
- `minilm_encoder()`, `new_head(...)`, `mean_pooled_logits(...)`: the sentiment task's
  pretrained all-MiniLM-L6-v2 encoder with a new mean-pooled Dense head.
- `random_bert_classifier(...)`, `random_llama(...)`: the benchmark shapes (MiniLM-shaped
  BERT, a small Llama), randomly initialised.
- `LinenLlama`, `linen_llama(...)`: a Llama-shaped linen model whose blocks are `nn.scan`ned
  (or unrolled), optionally remat'ed: the scanned-LLM case of the strategy tests and benchmarks
  (transformers' Flax Llama has no scanned form).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

import svft_jax

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub: everything here is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# How every experiment's loss runs the model (the label its results tables give step times).
EXECUTION = "wrap(auto, strict)"


def run_adapted(model, **options):
    """`model` taking the adapted tree in place of its params, on the library's fastest exact path.

    `svft_jax.wrap(model, "auto", strict=True)`: every adapted kernel runs with the cheapest of
    rebuild / factored / spectral for its shape and the call's token count (the FLOP model of
    `svft_jax.strategies.choose_strategy`), never a merged copy of the whole tree; `strict`
    turns any fallback to the merged kernel into an error. Results equal
    `model(..., params=svft_jax.merge(adapted))` to float rounding (tests/test_harness.py); a
    plain parameter tree (full fine-tuning, head only) passes through unchanged.

    Args:
      model: a transformers Flax model (its params are the `params` keyword: set by default)
        or any function of the params (`params_argnum=0`: pass `params_argname=None`).
      options: `svft_jax.wrap` keywords (`params_argname`, `params_argnum`, `overrides`).
    Returns:
      The `svft_jax.Wrapped` function.
    """
    options.setdefault("params_argname", "params")
    return svft_jax.wrap(model, "auto", strict=True, **options)


def init_tiny(model_class, config, input_shape: tuple[int, ...], seed: int = 0):
    """A randomly initialised HF Flax model whose init runs as ONE jitted call.

    (`model_class(config)` initialises eagerly, compiling every initializer op separately,
    which dominates a smoke test's runtime.) Returns (model, params); pass params explicitly.
    """
    model = model_class(config, seed=seed, _do_init=False)
    params = jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(seed), input_shape)
    return model, params


def tiny_bert_classifier(*, num_layers: int = 2, seq_len: int = 16, vocab_size: int = 64, seed: int = 0):
    """(FlaxBertForSequenceClassification, params): hidden 32, 2 heads, 2 labels, no dropout."""
    from transformers import BertConfig, FlaxBertForSequenceClassification

    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=seq_len, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return init_tiny(FlaxBertForSequenceClassification, config, (1, seq_len), seed)


def minilm_encoder(model_dir=None):
    """(Flax BERT module, pretrained params) of all-MiniLM-L6-v2, offline, without torch."""
    from svft_jax.models import load_pretrained, minilm_path

    model, params = load_pretrained(model_dir or minilm_path(), "FlaxBertModel")
    return model.module, params


def new_head(hidden_size: int, num_classes: int, seed: int) -> dict:
    """A new Dense head: kernel N(0, 0.02²) (BERT's initializer) (hidden, classes), bias 0."""
    kernel = 0.02 * jax.random.normal(jax.random.key(seed), (hidden_size, num_classes), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


def mean_pooled_logits(module) -> Callable:
    """forward(adapted, batch) -> logits (B, C): the adapted encoder (`run_adapted`: no merged
    copy), mean pooling, Dense head.

    `adapted` = {"encoder": params with adapter nodes, "classifier": {"kernel", "bias"}};
    `batch` holds input_ids and attention_mask (B, T). Dropout is off (deterministic): every
    method sees the same noise-free model.
    """

    def last_hidden_state(params, ids, mask, positions):
        return module.apply({"params": params}, ids, mask, jnp.zeros_like(ids), positions,
                            deterministic=True).last_hidden_state

    encode = run_adapted(last_hidden_state, params_argname=None, params_argnum=0)

    def forward(adapted, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        positions = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
        hidden = encode(adapted["encoder"], ids, mask, positions)
        weights = mask[..., None].astype(hidden.dtype)
        pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        head = adapted["classifier"]
        return pooled @ head["kernel"] + head["bias"]

    return forward


def random_bert_classifier(seed: int = 0):
    """all-MiniLM-L6-v2's shape (BERT, hidden 384, 6 layers, 12 heads, MLP 1536, vocab 30522),
    random, 2 labels: (model, params)."""
    from transformers import BertConfig, FlaxBertForSequenceClassification

    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                        vocab_size=30522, num_labels=2)
    return init_tiny(FlaxBertForSequenceClassification, config, (1, 8), seed)


def random_llama(*, max_length: int = 256, seed: int = 0):
    """A small random Llama (hidden 512, 8 layers, 8 heads, MLP 1376, vocab 8192): (model, params)."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1376, vocab_size=8192, max_position_embeddings=max_length)
    return init_tiny(FlaxLlamaForCausalLM, config, (1, 8), seed)


# ----------------------------------------------------------------------------- a linen Llama, scanned or not


class _LlamaBlock(nn.Module):
    """One pre-norm Llama block: RMSNorm, grouped-query attention with RoPE, RMSNorm, SwiGLU MLP.

    Kernels (no biases): q_proj (H, H), k_proj / v_proj (H, kv·hd), o_proj (H, H),
    gate_proj / up_proj (H, mlp), down_proj (mlp, H); hd = H / heads.
    """

    heads: int
    kv_heads: int
    mlp: int
    theta: float = 1e4

    @nn.compact
    def __call__(self, h, _):
        batch, length, hidden = h.shape
        hd = hidden // self.heads
        dense = functools.partial(nn.Dense, use_bias=False)
        x = nn.RMSNorm(name="input_norm")(h)
        q = dense(self.heads * hd, name="q_proj")(x).reshape(batch, length, self.heads, hd)
        k = dense(self.kv_heads * hd, name="k_proj")(x).reshape(batch, length, self.kv_heads, hd)
        v = dense(self.kv_heads * hd, name="v_proj")(x).reshape(batch, length, self.kv_heads, hd)
        q, k = _rope(q, self.theta), _rope(k, self.theta)
        group = self.heads // self.kv_heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        logits = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(hd).astype(q.dtype)
        causal = jnp.tril(jnp.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, logits, jnp.finfo(logits.dtype).min), axis=-1)
        attended = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(batch, length, hidden)
        h = h + dense(hidden, name="o_proj")(attended)
        x = nn.RMSNorm(name="post_norm")(h)
        h = h + dense(hidden, name="down_proj")(nn.silu(dense(self.mlp, name="gate_proj")(x)) * dense(self.mlp, name="up_proj")(x))
        return h, None


def _rope(x, theta: float):
    """Rotary embedding over the last axis (half-split pairs, as transformers' Llama): x (B, T, heads, hd)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1).astype(x.dtype)


class LinenLlama(nn.Module):
    """A Llama-shaped causal LM in linen, its blocks `nn.scan`ned (kernels stacked (layers, in, out)
    under "layers/...") or unrolled ("layers_0/...", ...); `remat` recomputes each block in the
    backward pass (how LLMs are trained). Tied head: logits = h · embedᵀ. ids (B, T) -> (B, T, vocab)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    scan: bool = True
    remat: bool = False

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.hidden, name="embed")
        h = embed(ids)
        block = nn.remat(_LlamaBlock) if self.remat else _LlamaBlock
        settings = dict(heads=self.heads, kv_heads=self.kv_heads, mlp=self.mlp)
        if self.scan:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
            h, _ = stack(name="layers", **settings)(h, None)
        else:
            for i in range(self.layers):
                h, _ = block(name=f"layers_{i}", **settings)(h, None)
        return embed.attend(nn.RMSNorm(name="norm")(h))


LINEN_LLAMA_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
# Scanned kernels are (layers, in, out): declared, never guessed (`svft_jax.apply(overrides=...)`).
LINEN_LLAMA_STACKED = {r"layers/.*kernel": {"layout": "stacked_in_out"}}


def linen_llama(*, vocab: int = 8192, hidden: int = 512, layers: int = 8, heads: int = 8, kv_heads: int = 8,
                mlp: int = 1376, scan: bool = True, remat: bool = False, seed: int = 0):
    """(apply_fn(params, ids) -> logits, params) of a random `LinenLlama` (defaults: bench_step's
    llama-4x256 shape)."""
    module = LinenLlama(vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, mlp=mlp,
                        scan=scan, remat=remat)
    params = jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    return (lambda p, ids: module.apply({"params": p}, ids)), params


def unstack_layers(params: dict, layers: int) -> dict:
    """A scanned LinenLlama's params as the unrolled model's ("layers" -> "layers_0", ...)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out
