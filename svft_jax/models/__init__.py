"""Model adapters: load local Hugging Face Flax checkpoints and pick SVFT targets per architecture.

    model, params = svft_jax.models.load_pretrained(svft_jax.models.minilm_path(), "FlaxBertModel")
    adapted = svft_jax.models.adapt(model, params, pattern="banded", d=2)
    out = model(input_ids, params=svft_jax.merge(adapted))

Flax linen and NNX models need no adapter: pass their `params` (or `nnx.split` state) to
`svft_jax.apply` directly; `attention_layouts` / `stacked_layouts` declare kernel layouts
that the shape alone leaves ambiguous.
"""

from svft_jax.models.hf import load_pretrained, minilm_path
from svft_jax.models.layouts import attention_layouts, stacked_layouts
from svft_jax.models.targets import (
    FAMILIES,
    ModelFamily,
    adapt,
    default_overrides,
    default_targets,
    family_of,
    model_type_of,
    supported_model_types,
)

__all__ = [
    "FAMILIES",
    "ModelFamily",
    "adapt",
    "attention_layouts",
    "default_overrides",
    "default_targets",
    "family_of",
    "load_pretrained",
    "minilm_path",
    "model_type_of",
    "stacked_layouts",
    "supported_model_types",
]
