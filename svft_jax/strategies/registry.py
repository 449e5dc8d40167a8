"""Execution strategies: functions `(node, use: KernelUse) -> y`, registered by name.

  rebuild    merge W once per call (cached across uses), then the model's own dense dot.
  factored   x ↦ x W0ᵀ + (x V)(U M)ᵀ via the node's protocol `matmul`; never forms W.
             Stacked kernels and dots that do not contract W's input axes are rebuilt.
  auto       per target and call: `choose_strategy(d1, d2, rank, tokens)` (see `cost.py`).
  reference  what the SVFT authors' layer does: densify M (r × r), rebuild U (Σ + M) Vᵀ
             (or W0 + U M Vᵀ) on every use, no caching. For benchmarks.

A new strategy is one function registered with `register_strategy(name, fn)`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from svft_jax._registry import Registry
from svft_jax.strategies.cost import choose_strategy
from svft_jax.transform.svft import SVFTNode

STRATEGIES: Registry[Callable] = Registry("strategy", "strategy")


def register_strategy(name: str, fn: Callable) -> Callable:
    """Add a strategy `fn(node, use) -> y` under `name` (an existing name is an error)."""
    return STRATEGIES.register(name, fn)


def get_strategy(name: str) -> Callable:
    """The strategy called `name`; ValueError listing the known names otherwise."""
    return STRATEGIES.get(name)


def available_strategies() -> tuple[str, ...]:
    return STRATEGIES.names()


def rebuild(node, use):
    """Merge once per call (memoised on the kernel), then the original dense dot."""
    return use.dense_merged()


def rebuild_remat(node, use):
    """Like `rebuild`, but W is recomputed in the backward pass instead of being kept from
    forward to backward (jax.checkpoint): one d1×d2 buffer less per layer at peak, for one
    extra merge (d1·d2·r) per step."""

    def run(node, x):
        return use.with_x(x).dense(node.materialize())

    use.record("rebuild_remat")
    return jax.checkpoint(run)(node, use.x)


def factored(node, use):
    """Never form W: the node's protocol `matmul` on x reshaped to (..., d2)."""
    if not use.matrix_form:
        return use.dense_merged()
    use.record("factored")
    y = node.matmul(use.input_matrix(), precision=use.precision, preferred_element_type=None)
    return use.output_from_matrix(y)


def auto(node, use):
    """Rebuild or factored for this target, whichever the FLOP model says is cheaper."""
    if not use.matrix_form:
        return use.dense_merged()
    layout = use.layout
    has_base = getattr(node, "base", None) is not None
    choice = choose_strategy(layout.d1, layout.d2, node.update_rank, use.tokens, has_base=has_base)
    return factored(node, use) if choice == "factored" else rebuild(node, use)


def reference(node, use):
    """SVFT's reference layer: rebuild W from a dense M on every use (no caching)."""
    if not isinstance(node, SVFTNode):
        return use.dense_merged()
    use.record("reference")
    return use.dense(node.reference_kernel())


register_strategy("rebuild", rebuild)
register_strategy("rebuild_remat", rebuild_remat)
register_strategy("factored", factored)
register_strategy("auto", auto)
register_strategy("reference", reference)
