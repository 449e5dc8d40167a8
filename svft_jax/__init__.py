"""svft-jax: SVFT (Lingam et al., NeurIPS 2024, arXiv:2405.19597) for JAX/Flax pytrees.

    adapted = svft_jax.apply(params, pattern="banded", d=2, extra="classifier/.*")
    train, frozen = svft_jax.split(adapted)          # the head is trainable: `extra` was declared once
    loss = lambda train: model_loss(svft_jax.merge(svft_jax.combine(train, frozen)))
    tx = svft_jax.optimizer(optax.adamw(1e-3))

Namespaces: `adapters` (many adapters on one base), `baselines` (LoRA, DoRA, VeRA), `training` (steps, losses, schedules), `checkpoint`
(Orbax checkpoints, adapter files, merged export, factor stores), `models` (Hugging Face
loading, default targets), `distributed` (meshes, sharding). Patterns live in `patterns`,
execution strategies in `strategies`, the adapter protocol in `transform`.
"""

from importlib import metadata as _metadata

from svft_jax.patterns import (
    PatternOptions,
    PatternSpec,
    available_patterns,
    banded_count,
    get_pattern,
    register_pattern,
)
from svft_jax.strategies import wrap
from svft_jax.training.optim import optimizer
from svft_jax.transform import (
    AdapterNode,
    KernelLayout,
    Plan,
    PrecisionWarning,
    SVFTMeta,
    SVFTNode,
    Trainable,
    adapter_node,
    combine,
    count_parameters,
    delta_matrix,
    frozen_field,
    is_node,
    labels,
    mark_trainable,
    merge,
    select_targets,
    split,
    summary,
    trainable_field,
    trainable_mask,
    weight_matrix,
)
from svft_jax.transform import apply as apply  # noqa: PLC0414  (the package's main verb)
from svft_jax.transform._plan import plan

try:
    __version__ = _metadata.version("svft-jax")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

# Namespaces with heavier imports (orbax, transformers) load on first attribute access, so
# `import svft_jax` stays fast while `svft_jax.checkpoint.save_adapter(...)` just works.
_LAZY_NAMESPACES = ("adapters", "baselines", "checkpoint", "distributed", "models", "nnx", "patterns", "strategies", "training", "transform")


def __getattr__(name):
    if name in _LAZY_NAMESPACES:
        import importlib

        return importlib.import_module(f"svft_jax.{name}")
    raise AttributeError(f"module 'svft_jax' has no attribute {name!r}")


__all__ = [
    "AdapterNode",
    "KernelLayout",
    "PatternOptions",
    "PatternSpec",
    "Plan",
    "PrecisionWarning",
    "SVFTMeta",
    "SVFTNode",
    "Trainable",
    "adapter_node",
    "apply",
    "available_patterns",
    "banded_count",
    "combine",
    "count_parameters",
    "delta_matrix",
    "frozen_field",
    "get_pattern",
    "is_node",
    "labels",
    "mark_trainable",
    "merge",
    "optimizer",
    "plan",
    "register_pattern",
    "select_targets",
    "split",
    "summary",
    "trainable_field",
    "trainable_mask",
    "weight_matrix",
    "wrap",
]
