"""Moved (issue 19): the protocol and generic verbs to `svft_jax.core`, SVFT to
`svft_jax.methods.svft`. This namespace re-exports its old names for one release (CHANGELOG.md)."""

from svft_jax.core import *  # noqa: F403
from svft_jax.methods.svft import *  # noqa: F403

# Exactly the names this namespace exported before issue 19 (all star-imported above).
__all__ = [  # noqa: F405
    "AdapterNode",
    "KernelLayout",
    "METHODS",
    "Plan",
    "PrecisionWarning",
    "Record",
    "SVFTMeta",
    "SVFTNode",
    "SVFTPlan",
    "Target",
    "Trainable",
    "adapter_node",
    "apply",
    "apply_method",
    "combine",
    "count_parameters",
    "delta_matrix",
    "frozen_field",
    "is_node",
    "labels",
    "mark_trainable",
    "merge",
    "select_targets",
    "split",
    "summary",
    "trainable_field",
    "trainable_mask",
    "weight_matrix",
]

# The old submodules, as attributes too (`svft_jax.transform._targets.flatten_by_path`).
from svft_jax.transform import (  # noqa: E402, F401
    _factorize,
    _matmul,
    _merge,
    _partition,
    _plan,
    _protocol,
    _summary,
    _targets,
    layout,
    svft,
)
