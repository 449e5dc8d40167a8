"""The "routed" execution strategy: adapter-set nodes run factored, per example."""

from __future__ import annotations

from svft_jax.methods.svft.banks._node import is_set_node
from svft_jax.strategies.registry import STRATEGIES, auto, register_strategy


def routed(node, use):
    """Set nodes: the node's factored matmul (per-example weights when routed; W never formed).
    Any other node: the "auto" strategy."""
    if not is_set_node(node):
        return auto(node, use)
    if not use.matrix_form:
        if node.routed:
            raise ValueError(f"{node.path!r}: per-example routing needs the kernel used as x ↦ x Wᵀ over its input "
                             "axes; this model uses it otherwise (a stacked scan or another contraction). Select one "
                             "adapter per call instead (svft_jax.adapters.select).")
        return use.dense_merged()
    use.record("routed")
    y = node.matmul(use.input_matrix(), precision=use.precision)
    return use.output_from_matrix(y)


if "routed" not in STRATEGIES.names():
    register_strategy("routed", routed)
