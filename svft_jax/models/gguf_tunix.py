"""GGUF (llama.cpp) decoders as Tunix Llama3 NNX models — numpy, gguf and Tunix only (no
transformers, no torch): the decoder path that keeps working on transformers 5.

    model = svft_jax.models.load_gguf_tunix(svft_jax.models.smollm2_path())
    logits, _ = model(tokens, positions, None, attention_mask)       # Tunix's call convention
    model = svft_jax.nnx.adapt(model, svft_jax.nnx.SVFT(pattern=svft_jax.nnx.Banded(d=2)), **model.get_model_input())

What is read, as `svft_jax.models.gguf` reads it for FlaxLlama (same tensors, same checks):
- **Config** (`tunix.models.llama3.model.ModelConfig`) from the `llama.*` metadata: layers,
  hidden size, FFN size, heads, KV heads, head size, RMS-norm epsilon, RoPE θ
  (`rope.freq_base`), vocabulary; `weight_tying` when the file has no `output.weight`.
  Refused: another architecture, RoPE scaling, per-frequency RoPE factors, biases (Tunix's
  Llama3 has none), heads that do not split the hidden size.
- **Weights**: GGUF stores (out, in) rows; Q and K rows are un-permuted per head
  (`unpermute_rope_rows`) from llama.cpp's adjacent-pair RoPE order to the half-split order that
  Tunix's `apply_rope` (like HF's) rotates. Tunix's layout: Q `(D, N, H)`, K and V `(D, K, H)`,
  O `(N, H, D)`, MLP kernels `(in, out)`, the embedding `(V, D)` (tied: the head is its
  transpose, Tunix's `Embedder.decode`).
- **RoPE θ.** Tunix's Llama3 attention (google-tunix 0.1.5) calls `apply_rope` without
  `config.rope_theta`, so every model rotates with its default θ = 1e6; SmolLM2 needs 1e5. The
  attention modules of a loaded model are therefore of a subclass whose `block` runs Tunix's own
  with `apply_rope` bound to the config's θ (a scoped rebinding of that one module global,
  restored after each call, under a lock). Where Tunix passes θ itself, the binding changes
  nothing.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from typing import Any

import numpy as np

from svft_jax._paths import path_to_str
from svft_jax.models.gguf import (
    _check_llama_file,
    _field,
    _float32,
    _reader,
    _source,
    read_gguf_weights,
)

__all__ = ["load_gguf_tunix", "tunix_llama_config"]


def tunix_llama_config(path_or_reader, **overrides):
    """The Tunix `llama3.ModelConfig` described by a GGUF file's metadata.

    Args:
      path_or_reader: a .gguf path or a `gguf.GGUFReader`.
      **overrides: ModelConfig fields to set instead (e.g. `remat_config`).
    Raises:
      ValueError naming the file: another architecture, RoPE scaling or per-frequency factors,
      a head size that does not split the hidden size, biases.
    """
    from tunix.models.llama3 import model as llama3

    reader = _reader(path_or_reader)
    source, arch, tensors, heads, hidden, head_dim = _check_llama_file(reader, "Tunix's Llama3")
    if any(name.endswith(".bias") for name in tensors):
        raise ValueError(f"{source}: the file has biases ({sorted(n for n in tensors if n.endswith('.bias'))[:3]}); "
                         "Tunix's Llama3 has no bias. Use svft_jax.models.load_gguf (FlaxLlama) instead.")
    scaling = _field(reader, f"{arch}.rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise ValueError(f"{source}: RoPE scaling {scaling!r} is not supported by Tunix's Llama3.")
    tokens = _field(reader, "tokenizer.ggml.tokens", None)
    theta = _float32(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    kwargs: dict[str, Any] = dict(
        num_layers=int(_field(reader, f"{arch}.block_count")),
        vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens) if tokens is not None else 0)),
        embed_dim=hidden,
        hidden_dim=int(_field(reader, f"{arch}.feed_forward_length")),
        num_heads=heads,
        head_dim=head_dim,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        rope_theta=int(theta) if float(theta).is_integer() else theta,
        norm_eps=_float32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        weight_tying="output.weight" not in tensors,
    )
    kwargs.update(overrides)
    if kwargs["num_heads"] % kwargs["num_kv_heads"]:
        raise ValueError(f"{source}: {kwargs['num_kv_heads']} KV heads do not divide {kwargs['num_heads']} heads.")
    return llama3.ModelConfig(**kwargs)


_ROPE_LOCK = threading.RLock()


@contextlib.contextmanager
def _rope_theta(module, theta):
    """`module.apply_rope` bound to `theta` for the duration (see the module docstring)."""
    with _ROPE_LOCK:
        original = module.apply_rope
        module.apply_rope = functools.partial(original, rope_theta=theta)
        try:
            yield
        finally:
            module.apply_rope = original


@functools.cache
def _attention_class():
    """Tunix's Attention with its RoPE at `config.rope_theta` (built once, on first use)."""
    from tunix.models.llama3 import model as llama3

    base = llama3.Attention

    def block(self, *args, **kwargs):
        with _rope_theta(llama3, self.config.rope_theta):
            return base.block(self, *args, **kwargs)

    keywords = {"pytree": base._pytree__is_pytree} if hasattr(base, "_pytree__is_pytree") else {}
    namespace = {"block": block, "__module__": __name__, "__doc__": "Tunix's Llama3 Attention, RoPE at config.rope_theta."}
    return types.new_class("RopeThetaAttention", (base,), keywords, lambda ns: ns.update(namespace))


def _tunix_tree(flat_tree: dict, config) -> dict:
    """`read_gguf_weights`' FlaxLlama tree (kernels (in, out)) as Tunix Llama3's pure dict."""
    model = flat_tree["model"]
    d, n, k, h = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
    layers = {}
    for i in range(config.num_layers):
        layer = model["layers"][str(i)]
        attn, mlp = layer["self_attn"], layer["mlp"]
        layers[i] = {
            "input_layernorm": {"w": layer["input_layernorm"]["weight"]},
            "post_attention_layernorm": {"w": layer["post_attention_layernorm"]["weight"]},
            "attn": {"q_proj": {"w": attn["q_proj"]["kernel"].reshape(d, n, h)},
                     "k_proj": {"w": attn["k_proj"]["kernel"].reshape(d, k, h)},
                     "v_proj": {"w": attn["v_proj"]["kernel"].reshape(d, k, h)},
                     "o_proj": {"w": attn["o_proj"]["kernel"].reshape(n, h, d)}},
            "mlp": {name: {"kernel": mlp[name]["kernel"]} for name in ("gate_proj", "up_proj", "down_proj")},
        }
    tree = {"embedder": {"input_embedding": model["embed_tokens"]["embedding"]}, "layers": layers,
            "final_norm": {"w": model["norm"]["weight"]}}
    if "lm_head" in flat_tree:
        tree["lm_head"] = {"w": flat_tree["lm_head"]["kernel"]}
    return tree


def load_gguf_tunix(path, **config_overrides):
    """A llama-architecture GGUF file as a Tunix `Llama3` NNX model (float32 weights).

    Args:
      path: the .gguf file (e.g. `svft_jax.models.smollm2_path()`) or a `gguf.GGUFReader`.
      **config_overrides: `llama3.ModelConfig` fields (see `tunix_llama_config`).
    Returns:
      The model: `logits, cache = model(tokens, positions, cache, attention_mask)`; its attention
      rotates with the file's RoPE θ (see the module docstring).
    Raises:
      ValueError naming the file for what Tunix's Llama3 cannot represent, or a tensor with no
      place in it.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tunix.models.llama3 import model as llama3

    reader = _reader(path)
    config = tunix_llama_config(reader, **config_overrides)
    shapes = types.SimpleNamespace(num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                                   num_key_value_heads=config.num_kv_heads)
    tree = _tunix_tree(read_gguf_weights(reader, shapes), config)
    # Built abstractly (no random initialisation), then filled with the file's tensors.
    model = nnx.eval_shape(lambda: llama3.Llama3(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    expected = {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(state)}
    got = {path_to_str(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:4]
        extra = sorted(set(got) - set(expected))[:4]
        wrong = sorted(p for p in set(expected) & set(got) if expected[p] != got[p])[:4]
        raise ValueError(f"load_gguf_tunix: {_source(reader)} does not fit Tunix's Llama3 for its config (missing {missing}, "
                         f"unexpected {extra}, other shapes {wrong}).")
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree))
    nnx.update(model, state)
    attention = _attention_class()
    for _, module in nnx.iter_modules(model):
        if type(module) is llama3.Attention:
            module.__class__ = attention
    return model
