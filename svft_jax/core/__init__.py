"""The generic core: the adapter protocol (`AdapterNode`, its fields and hooks), kernel layouts,
target selection, typed rules, the verbs over adapted pytrees (merge, split/combine, masks,
summary, the sizing report). Nothing here names a method: methods live in `svft_jax.methods`.

Extending: a new method is one file with an `@adapter_node(method=...)` dataclass subclassing
`AdapterNode` (see `_protocol.py`); everything generic then works on it.
"""

from svft_jax.core._adapt import adapt, apply_method
from svft_jax.core._merge import delta_matrix, merge, weight_matrix
from svft_jax.core._partition import combine, labels, split, trainable_mask
from svft_jax.core._protocol import (
    METHODS,
    AdapterNode,
    ArraySpec,
    Plan,
    Record,
    Trainable,
    adapter_node,
    frozen_field,
    is_node,
    trainable_field,
)
from svft_jax.core._rules import Method, Rule
from svft_jax.core._size import SizeReport, size
from svft_jax.core._summary import count_parameters, summary
from svft_jax.core._targets import Target, mark_trainable, select_targets
from svft_jax.core.layout import KernelLayout

__all__ = [
    "METHODS",
    "AdapterNode",
    "ArraySpec",
    "KernelLayout",
    "Method",
    "Plan",
    "Record",
    "Rule",
    "SizeReport",
    "Target",
    "Trainable",
    "adapt",
    "adapter_node",
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
    "size",
    "split",
    "summary",
    "trainable_field",
    "trainable_mask",
    "weight_matrix",
]
