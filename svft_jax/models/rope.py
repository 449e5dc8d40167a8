"""RoPE with the configured base: transformers' Flax decoders corrected to honour `config.rope_theta`.

transformers' (4.45 – 4.57) FlaxLlama, FlaxMistral and FlaxGemma build their rotary tables with
a hard-coded base of 10000 — `create_sinusoidal_positions(num_pos, dim)` never sees the config —
so a checkpoint trained with another base (SmolLM2: 1e5, Llama-3: 5e5, Mistral-7B-v0.2: 1e6)
runs with the wrong rotation angles. Short contexts still look fluent (at position p the
angle error of frequency i is p·|θ_true^(-2i/d) − 10000^(-2i/d)|, small while p is small),
which is why the bug goes unnoticed; past a few hundred tokens perplexity degrades.
The stock tables also ignore `config.rope_scaling` (Llama-3.1's "llama3", "linear").

`honour_rope_theta()` replaces, in each affected transformers module, the rotary-embedding
class that the attention layer instantiates (`modeling_flax_llama.FlaxLlamaRotaryEmbedding`,
...) by a subclass whose table is computed in float64 from `config.rope_theta` and
`config.rope_scaling` and stored as float32 (the stock one rounds the angles to float32 before
the sine, losing ~1e-4 at position 8000). The rotation itself (`rotate_half`, the half-split
layout of HF checkpoints) and the parameter tree are unchanged. The patch is:

- global to the process and idempotent (linen re-runs `setup` on every call, so models built
  before the patch are fixed too; functions jitted before it keep their traced tables);
- guarded: applied only where the module still has the stock structure (the class exists and
  the attention `setup` instantiates it by that name); elsewhere a `RopePatchWarning` says what
  was left alone. On transformers ≥ 5 (no Flax models to patch) it raises
  `FlaxModelsUnavailableError`;
- reversible for comparisons: `with stock_rope(): ...` restores transformers' classes.

`svft_jax.models.load_pretrained` calls `honour_rope_theta()`.

Families checked (transformers 4.57): Llama, Mistral, Gemma — patched (Gemma builds its own
table, with `config.head_dim`, and also ignores `rope_theta`). GPT-J — not patched: its config
has no `rope_theta` and GPT-J is trained with base 10000, so the stock table is right
(`rotary_dim` is honoured). GPT-Neo, GPT-2, BERT-likes — learned absolute positions, no RoPE.
RoFormer, Marian, Pegasus, XGLM, Whisper — fixed sinusoids of base 10000 by definition, no
`rope_theta` in their configs. GPT-NeoX (Pythia) — no Flax implementation in transformers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import math
import warnings

import numpy as np

from svft_jax.errors import RopePatchWarning
from svft_jax.models._transformers import require_flax_models

__all__ = [
    "ROPE_FAMILIES",
    "RopePatchWarning",
    "honour_rope_theta",
    "is_rope_patched",
    "rope_inverse_frequencies",
    "rope_table",
    "rope_theta_of",
    "stock_rope",
]


@dataclasses.dataclass(frozen=True)
class _RopeFamily:
    module: str  # transformers.models.<module>
    rotary: str  # the rotary-embedding class the attention layer instantiates
    attention: str  # the attention class whose setup instantiates it
    head_dim_from_config: bool  # Gemma: config.head_dim; Llama/Mistral: hidden_size // heads


ROPE_FAMILIES: dict[str, _RopeFamily] = {
    "llama": _RopeFamily("llama.modeling_flax_llama", "FlaxLlamaRotaryEmbedding", "FlaxLlamaAttention", False),
    "mistral": _RopeFamily("mistral.modeling_flax_mistral", "FlaxMistralRotaryEmbedding", "FlaxMistralAttention", False),
    "gemma": _RopeFamily("gemma.modeling_flax_gemma", "FlaxGemmaRotaryEmbedding", "FlaxGemmaAttention", True),
}

_STOCK: dict[str, type] = {}  # family -> transformers' original class, while patched


def rope_theta_of(config) -> float:
    """The config's RoPE base θ: `config.rope_theta` (transformers 4) or
    `config.rope_parameters["rope_theta"]` (transformers 5); 10000 when the config sets none."""
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        return float(parameters["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _scaling(config) -> dict | None:
    parameters = getattr(config, "rope_parameters", None)
    # transformers 5 keeps the scaling in `rope_parameters` beside θ; 4 in `rope_scaling`.
    scaling = parameters if isinstance(parameters, dict) and "rope_theta" in parameters else getattr(
        config, "rope_scaling", None)
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise TypeError(f"config.rope_scaling must be a dict or None, got {scaling!r}.")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind == "default" else {**scaling, "rope_type": kind}


def rope_inverse_frequencies(config, head_dim: int) -> np.ndarray:
    """The RoPE inverse frequencies θ^(-2i/d), i < d/2, float64, with `config.rope_scaling` applied.

    Args:
      config: a transformers config with `rope_theta` (default 10000) and optionally
        `rope_scaling` ({"rope_type": "linear", "factor": f} or Llama-3.1's "llama3"); on
        transformers 5 both live in `config.rope_parameters`.
      head_dim: d, the rotated dimension (even).
    Returns:
      (d/2,) float64.
    Raises:
      ValueError: an odd `head_dim`, a non-positive `rope_theta`, or a `rope_scaling` type
        other than default / linear / llama3 (dynamic, yarn, longrope are not implemented, and
        running with plain RoPE instead would silently mis-run the checkpoint).
    """
    theta = rope_theta_of(config)
    if head_dim % 2 or head_dim <= 0:
        raise ValueError(f"RoPE head_dim must be a positive even number, got {head_dim}.")
    if not theta > 0:
        raise ValueError(f"config.rope_theta must be positive, got {theta}.")
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    scaling = _scaling(config)
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        # Llama-3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        original = float(scaling["original_max_position_embeddings"])
        wavelength = 2 * math.pi / inv_freq
        smooth = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq
    raise ValueError(
        f"config.rope_scaling type {kind!r} is not implemented by svft_jax.models.rope "
        "(supported: default, linear, llama3); transformers' Flax models ignore rope_scaling, "
        "so this checkpoint cannot be run correctly in Flax."
    )


def rope_table(config, head_dim: int, num_positions: int):
    """The sin/cos table the Flax rotary modules index: (num_positions, 1, 2·head_dim) float32 jax array.

    Row p is [sin(p·f), sin(p·f), cos(p·f), cos(p·f)] blocks (f = `rope_inverse_frequencies`,
    each block d/2 long), the layout of transformers' `create_sinusoidal_positions`, so
    `jnp.split(table[position_ids], 2, -1)` gives the (sin, cos) that `apply_rotary_pos_emb`
    expects for HF's half-split rotation. Angles and sines are computed in float64.
    """
    import jax.numpy as jnp

    inv_freq = rope_inverse_frequencies(config, head_dim)
    angles = np.arange(num_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    table = np.concatenate([np.sin(angles)[:, None, :], np.cos(angles)[:, None, :]], axis=-1)
    return jnp.asarray(table.astype(np.float32))


def _patched_class(stock: type, family: _RopeFamily) -> type:
    def setup(self):
        config = self.config
        head_dim = config.head_dim if family.head_dim_from_config else config.hidden_size // config.num_attention_heads
        self.sincos = rope_table(config, head_dim, config.max_position_embeddings)

    # A linen subclass: same fields (config, dtype) and __call__, only the table differs.
    return type(stock.__name__, (stock,), {"setup": setup, "__module__": __name__, "__doc__": (
        f"{stock.__name__} with the table from config.rope_theta / rope_scaling (svft_jax.models.rope)."
    ), "_svft_stock": stock})


def _module(family: _RopeFamily):
    return importlib.import_module(f"transformers.models.{family.module}")


def _check_structure(name: str, family: _RopeFamily, module) -> str | None:
    """None if `module` has the structure the patch relies on, else why not."""
    rotary, attention = getattr(module, family.rotary, None), getattr(module, family.attention, None)
    if rotary is None or attention is None:
        return f"{module.__name__} has no {family.rotary} / {family.attention}"
    try:
        source = inspect.getsource(attention.setup)
    except (OSError, TypeError):
        return f"the source of {family.attention}.setup is unavailable"
    if f"{family.rotary}(" not in source:
        return f"{family.attention}.setup no longer instantiates {family.rotary}"
    return None


def honour_rope_theta() -> tuple[str, ...]:
    """Make transformers' Flax Llama, Mistral and Gemma compute RoPE from `config.rope_theta`.

    Idempotent and process-wide (see the module docstring). Called by `load_pretrained`; call
    it yourself before building such a model from a config by hand.

    Returns:
      The families now patched (a subset of `ROPE_FAMILIES`); a family whose transformers
      module does not have the expected structure is skipped with a `RopePatchWarning`.
    """
    require_flax_models("svft_jax.models.honour_rope_theta (it patches transformers' Flax Llama/Mistral/Gemma)")
    patched = []
    for name, family in ROPE_FAMILIES.items():
        if name in _STOCK:
            patched.append(name)
            continue
        module = _module(family)
        problem = _check_structure(name, family, module)
        if problem is not None:
            warnings.warn(f"honour_rope_theta: {name} left unpatched: {problem}. Check that its RoPE "
                          "uses config.rope_theta before trusting long-context outputs.", RopePatchWarning,
                          stacklevel=2)
            continue
        stock = getattr(module, family.rotary)
        setattr(module, family.rotary, _patched_class(stock, family))
        _STOCK[name] = stock
        patched.append(name)
    return tuple(patched)


def is_rope_patched(family: str = "llama") -> bool:
    """Whether `family`'s Flax rotary embedding currently honours `config.rope_theta`."""
    if family not in ROPE_FAMILIES:
        raise ValueError(f"is_rope_patched: unknown family {family!r}; known: {sorted(ROPE_FAMILIES)}.")
    return family in _STOCK


@contextlib.contextmanager
def stock_rope():
    """Temporarily restore transformers' own (base-10000) rotary classes, e.g. to compare against them.

    Functions jitted inside the block keep the stock tables they traced.
    """
    restored = dict(_STOCK)
    for name, stock in restored.items():
        setattr(_module(ROPE_FAMILIES[name]), ROPE_FAMILIES[name].rotary, stock)
        del _STOCK[name]
    try:
        yield
    finally:
        for name, stock in restored.items():
            module = _module(ROPE_FAMILIES[name])
            setattr(module, ROPE_FAMILIES[name].rotary, _patched_class(stock, ROPE_FAMILIES[name]))
            _STOCK[name] = stock
