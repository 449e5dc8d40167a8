"""svft-jax: SVFT (Lingam et al., NeurIPS 2024, arXiv:2405.19597) for JAX/Flax pytrees.

    adapted = svft_jax.apply(params, pattern="banded", d=2, extra="classifier/.*")
    train, frozen = svft_jax.split(adapted)          # the head is trainable: `extra` was declared once
    loss = lambda train: model_loss(svft_jax.merge(svft_jax.combine(train, frozen)))
    tx = svft_jax.optimizer(optax.adamw(1e-3))

Namespaces: `banks` (many SVFT adapters on one base; `adapters` before), `baselines` (LoRA, DoRA, VeRA keyword `apply`s), `training` (steps, losses, schedules), `checkpoint`
(Orbax checkpoints, adapter files, merged export, factor stores), `models` (Hugging Face
loading, default targets), `distributed` (meshes, sharding). Patterns live in `patterns`,
execution strategies in `strategies`, the adapter protocol and generic verbs in `core`, the
methods (typed configs, plans, nodes) in `methods`, warning and error classes in `errors`.
"""

from svft_jax._version import __version__ as __version__  # noqa: PLC0414
from svft_jax.core import (
    AdapterNode,
    Method,
    Plan,
    Rule,
    SizeReport,
    Trainable,
    adapt,
    adapter_node,
    combine,
    count_parameters,
    frozen_field,
    is_node,
    mark_trainable,
    merge,
    select_targets,
    size,
    split,
    summary,
    trainable_field,
    trainable_mask,
)
from svft_jax.core._size import plan  # `size` before issue 19 (alias, one release)
from svft_jax.methods.dora import DoRA
from svft_jax.methods.lora import LoRA
from svft_jax.methods.svft import SVFT, SVFTNode
from svft_jax.methods.svft import apply as apply  # noqa: PLC0414  (the package's main verb)
from svft_jax.methods.vera import VeRA
from svft_jax.patterns import (
    Banded,
    Plain,
    Random,
    TopK,
)
from svft_jax.strategies import wrap
from svft_jax.training.optim import optimizer

# Namespaces with heavier imports (orbax, transformers) load on first attribute access, so
# `import svft_jax` stays fast while `svft_jax.checkpoint.save_adapter(...)` just works.
_LAZY_NAMESPACES = ("adapters", "baselines", "checkpoint", "distributed", "models", "nnx", "patterns", "strategies", "training", "transform", "banks", "core", "methods")


def __getattr__(name):
    if name in _LAZY_NAMESPACES:
        import importlib

        return importlib.import_module(f"svft_jax.{name}")
    raise AttributeError(f"module 'svft_jax' has no attribute {name!r}")


# Still attributes here for one release, no longer in `__all__` (issue 19: the top level holds
# the verbs, the typed configs and the protocol; CHANGELOG.md): the pattern registry (see
# `svft_jax.patterns`), SVFTMeta (`svft_jax.methods.svft`), PrecisionWarning (`svft_jax.errors`),
# delta_matrix, weight_matrix, labels, KernelLayout (`svft_jax.core`).
from svft_jax.core import KernelLayout, delta_matrix, labels, weight_matrix  # noqa: E402, F401, I001
from svft_jax.errors import PrecisionWarning  # noqa: E402, F401
from svft_jax.methods.svft import SVFTMeta  # noqa: E402, F401
from svft_jax.patterns import (  # noqa: E402, F401
    PatternOptions,
    PatternSpec,
    available_patterns,
    banded_count,
    get_pattern,
    register_pattern,
)

__all__ = [
    "AdapterNode",
    "Banded",
    "DoRA",
    "LoRA",
    "Method",
    "Plain",
    "Plan",
    "Random",
    "Rule",
    "SVFT",
    "SVFTNode",
    "SizeReport",
    "TopK",
    "Trainable",
    "VeRA",
    "adapt",
    "adapter_node",
    "apply",
    "combine",
    "count_parameters",
    "frozen_field",
    "is_node",
    "mark_trainable",
    "merge",
    "optimizer",
    "plan",
    "select_targets",
    "size",
    "split",
    "summary",
    "trainable_field",
    "trainable_mask",
    "wrap",
]
