"""svft-jax: SVFT (Lingam et al., NeurIPS 2024, arXiv:2405.19597) for JAX/Flax pytrees.

    adapted = svft_jax.apply(params, pattern="banded", d=2)
    train, frozen = svft_jax.split(adapted)
    loss = lambda train: model_loss(svft_jax.merge(svft_jax.combine(train, frozen)))
    tx = svft_jax.optimizer(optax.adamw(1e-3), adapted)

Subpackages: patterns (Ω), transform (the node, apply/merge), strategies (execution: wrap),
training (steps, losses, schedules, optimizer), distributed (meshes, sharding, pmap),
checkpoint (Orbax checkpoints, adapters, merged export), models (Hugging Face loaders and
targets), baselines (LoRA, DoRA, VeRA).
"""

from svft_jax.patterns import (
    PatternOptions,
    PatternSpec,
    available_patterns,
    banded_count,
    get_pattern,
    register_pattern,
)
from svft_jax.strategies import wrap
from svft_jax.training import optimizer
from svft_jax.transform import (
    KernelLayout,
    SVFTMeta,
    SVFTNode,
    combine,
    count_parameters,
    delta_matrix,
    is_node,
    labels,
    merge,
    select_targets,
    split,
    summary,
    trainable_mask,
    weight_matrix,
)
from svft_jax.transform import apply as apply  # noqa: PLC0414  (the package's main verb)

__version__ = "0.1.0"

# Subpackages with heavier imports (orbax, transformers) load on first attribute access, so
# `import svft_jax` stays fast while `svft_jax.checkpoint.save_adapter(...)` just works.
_LAZY_SUBPACKAGES = ("baselines", "checkpoint", "distributed", "models", "patterns", "strategies", "training", "transform")


def __getattr__(name):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f"svft_jax.{name}")
    raise AttributeError(f"module 'svft_jax' has no attribute {name!r}")


__all__ = [
    "KernelLayout",
    "PatternOptions",
    "PatternSpec",
    "SVFTMeta",
    "SVFTNode",
    "apply",
    "available_patterns",
    "banded_count",
    "combine",
    "count_parameters",
    "delta_matrix",
    "get_pattern",
    "is_node",
    "labels",
    "merge",
    "optimizer",
    "register_pattern",
    "select_targets",
    "split",
    "summary",
    "trainable_mask",
    "weight_matrix",
    "wrap",
]
