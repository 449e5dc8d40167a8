"""The adapter protocol and the generic transform over pytrees: targets, merge, split/combine,
masks, summaries; `svft.py` is the SVFT method (its node, math and `apply`).

Extending: a new method is one file with an `@adapter_node(method=...)` dataclass subclassing
`AdapterNode` (see `_protocol.py`); everything generic then works on it.
"""

from svft_jax.transform._merge import delta_matrix, merge, weight_matrix
from svft_jax.transform._partition import combine, labels, split, trainable_mask
from svft_jax.transform._protocol import (
    METHODS,
    AdapterNode,
    Plan,
    Record,
    Trainable,
    adapter_node,
    frozen_field,
    is_node,
    trainable_field,
)
from svft_jax.transform._summary import count_parameters, summary
from svft_jax.transform._targets import Target, apply_method, mark_trainable, select_targets
from svft_jax.transform.layout import KernelLayout
from svft_jax.transform.svft import PrecisionWarning, SVFTMeta, SVFTNode, SVFTPlan, apply

__all__ = [
    "METHODS",
    "AdapterNode",
    "KernelLayout",
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
