"""Execution strategies: functions `(node, use: KernelUse) -> y`, registered by name.

  rebuild    merge W once per call (cached across uses), then the model's own dense dot.
  factored   x ↦ x W0ᵀ + (x V)(U M)ᵀ via the node's protocol `matmul`; never forms W.
             Stacked kernels and dots that do not contract W's input axes are rebuilt.
  spectral   the node's `spectral_matmul` hook (SVFT: x ↦ ((x V)(Σ + M)ᵀ) Uᵀ, never touching
             W0) for nodes whose `spectral_ready` hook says it is exact; any other node runs
             `factored`, with a `StrategyFallbackWarning`.
  auto       per target and call, the cheapest by `choose_strategy` (see `core/_cost.py`) among
             rebuild, factored and (for nodes whose `spectral_exact` hook holds) spectral.

A method may register strategies of its own from its own file (SVFT's "reference", the
authors' layer, in `svft_jax/methods/svft/_node.py`). A new strategy is one function
registered with `register_strategy(name, fn)`; `fn.applies_to = predicate(node)` names the
nodes it is defined for (others are merged densely and reported as a fallback).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax

from svft_jax._registry import Registry
from svft_jax.core._cost import choose_strategy
from svft_jax.errors import PrecisionWarning, StrategyFallbackWarning

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


def spectral(node, use):
    """((x V)(Σ + M)ᵀ) Uᵀ: the node's `spectral_matmul`, W0 never read.

    Falls back to `factored` (with a StrategyFallbackWarning) for nodes it cannot run exactly:
    non-SVFT nodes and truncated-rank SVFT nodes with a residual. With bfloat16 factors and a
    stored W0 it runs but warns (PrecisionWarning): U Σ Vᵀ in bfloat16 is W0 only to ~4e-3.
    """
    if not use.matrix_form:
        return use.dense_merged()
    if not node.spectral_ready:
        warnings.warn(f"{use.proxy.path}: strategy 'spectral' needs a full-rank SVFT node (or one without a residual); "
                      f"{node.describe()} of rank {node.update_rank} runs 'factored' instead.", StrategyFallbackWarning, stacklevel=2)
        return factored(node, use)
    if not node.spectral_exact:
        warnings.warn(f"{use.proxy.path}: strategy 'spectral' on {node.describe()} ignores the stored W0 and uses its "
                      "factors in its place, which differ from W0 beyond float32 rounding (~4e-3 relative for bfloat16 "
                      "factors); use 'rebuild' or 'factored' to keep W0 exact.", PrecisionWarning, stacklevel=2)
    use.record("spectral")
    y = node.spectral_matmul(use.input_matrix(), precision=use.precision, preferred_element_type=None)
    return use.output_from_matrix(y)


def auto(node, use):
    """The cheapest of rebuild, factored and spectral for this target and call by the FLOP
    model (`choose_strategy`); spectral is a candidate only where it is exact (the node's `spectral_exact`)."""
    if not use.matrix_form:
        return use.dense_merged()
    layout = use.layout
    has_base = getattr(node, "base", None) is not None
    candidates = ("rebuild", "spectral", "factored") if node.spectral_exact else ("rebuild", "factored")
    choice = choose_strategy(layout.d1, layout.d2, node.update_rank, use.tokens, has_base=has_base,
                             entries=node.sparse_entries, candidates=candidates)
    return {"rebuild": rebuild, "factored": factored, "spectral": spectral}[choice](node, use)


register_strategy("rebuild", rebuild)
register_strategy("rebuild_remat", rebuild_remat)
register_strategy("factored", factored)
register_strategy("spectral", spectral)
register_strategy("auto", auto)


def drop_unused_base(adapted):
    """`adapted` without W0 in every node that no strategy `auto` can choose reads it from
    (each node's `without_unused_base` hook).

    SVFT: a full-rank node with float32 (or wider) factors has W0 = U Σ Vᵀ to SVD rounding, and
    for it `auto` only ever picks rebuild (which then forms U (Σ + M) Vᵀ) or spectral: factored,
    the one strategy that multiplies by W0, costs more than spectral at full rank for every T
    (`cost.py`). So W0 — d1·d2 values per target, as large as the model — need not be kept
    (`keep_base=False` is recorded in the node's plan, so adapter files record it). The decision
    does not depend on the token count. Kept: truncated-rank nodes (their residual is part of W),
    nodes with bfloat16/float16 factors, and every node of a method without a spectral form.

    Args: adapted: a tree from `svft_jax.apply` (trainable and frozen halves combined).
    Returns: the same tree, nodes without the W0 they do not need (SVFT: equal to
      `svft_jax.apply(..., keep_base=False)` on the same params).
    """
    from svft_jax.core._protocol import is_node

    return jax.tree.map(lambda x: x.without_unused_base() if is_node(x) else x, adapted, is_leaf=is_node)
