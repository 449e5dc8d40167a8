"""Execution strategies: functions `(node, use: KernelUse) -> y`, registered by name.

  rebuild    merge W once per call (cached across uses), then the model's own dense dot.
  factored   x ↦ x W0ᵀ + (x V)(U M)ᵀ via the node's protocol `matmul`; never forms W.
             Stacked kernels and dots that do not contract W's input axes are rebuilt.
  spectral   x ↦ ((x V)(Σ + M)ᵀ) Uᵀ via `SVFTNode.spectral_matmul`: never touches W0, Ω
             applied on the r-dimensional activations. Full-rank SVFT nodes (or nodes without
             a residual); any other node runs `factored`, with a `StrategyFallbackWarning`.
  auto       per target and call, the cheapest by `choose_strategy` (see `cost.py`) among
             rebuild, factored and (for `spectral_ready` SVFT nodes) spectral.
  reference  the SVFT authors' layer: W rebuilt on every use as U · ((Σ + M) Vᵀ) with
             Σ + M a sparse (COO) r × r matrix (`SVFTNode.reference_kernel`), no caching.
             For benchmarks.

A new strategy is one function registered with `register_strategy(name, fn)`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from svft_jax._registry import Registry
from svft_jax.strategies.cost import choose_strategy
from svft_jax.strategies.interpreter import FallbackWarning
from svft_jax.transform.svft import PrecisionWarning, SVFTNode


class StrategyFallbackWarning(FallbackWarning):
    """A forced strategy cannot run a target as asked and another one (not the dense merge)
    runs it instead, e.g. spectral on a truncated-rank node runs factored."""

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


def _spectral_exact(node) -> bool:
    """Spectral reproduces the node's W to float32 rounding: spectral_ready, and W0 is either
    not stored or equals U Σ Vᵀ to float32 rounding (float32+ factors)."""
    if not (isinstance(node, SVFTNode) and node.spectral_ready):
        return False
    return node.base is None or jnp.dtype(node.u.dtype).itemsize >= 4


def spectral(node, use):
    """((x V)(Σ + M)ᵀ) Uᵀ: the node's `spectral_matmul`, W0 never read.

    Falls back to `factored` (with a StrategyFallbackWarning) for nodes it cannot run exactly:
    non-SVFT nodes and truncated-rank SVFT nodes with a residual. With bfloat16 factors and a
    stored W0 it runs but warns (PrecisionWarning): U Σ Vᵀ in bfloat16 is W0 only to ~4e-3.
    """
    if not use.matrix_form:
        return use.dense_merged()
    if not (isinstance(node, SVFTNode) and node.spectral_ready):
        warnings.warn(f"{use.proxy.path}: strategy 'spectral' needs a full-rank SVFT node (or one without a residual); "
                      f"{node.describe()} of rank {node.update_rank} runs 'factored' instead.", StrategyFallbackWarning, stacklevel=2)
        return factored(node, use)
    if not _spectral_exact(node):
        warnings.warn(f"{use.proxy.path}: strategy 'spectral' with {jnp.dtype(node.u.dtype).name} factors ignores the stored "
                      "W0 and uses U Σ Vᵀ in its place, which differs from W0 by ~4e-3 relative; use 'rebuild' or "
                      "'factored' to keep W0 exact.", PrecisionWarning, stacklevel=2)
    use.record("spectral")
    y = node.spectral_matmul(use.input_matrix(), precision=use.precision, preferred_element_type=None)
    return use.output_from_matrix(y)


def auto(node, use):
    """The cheapest of rebuild, factored and spectral for this target and call by the FLOP
    model (`choose_strategy`); spectral is a candidate only where it is exact (`_spectral_exact`)."""
    if not use.matrix_form:
        return use.dense_merged()
    layout = use.layout
    has_base = getattr(node, "base", None) is not None
    candidates = ("rebuild", "spectral", "factored") if _spectral_exact(node) else ("rebuild", "factored")
    entries = node.meta.num_entries if isinstance(node, SVFTNode) else None
    choice = choose_strategy(layout.d1, layout.d2, node.update_rank, use.tokens, has_base=has_base,
                             entries=entries, candidates=candidates)
    return {"rebuild": rebuild, "factored": factored, "spectral": spectral}[choice](node, use)


def reference(node, use):
    """The SVFT authors' layer: W = U · ((Σ + M) Vᵀ), the inner product sparse, rebuilt on
    every use (no caching); see `SVFTNode.reference_kernel`."""
    if not isinstance(node, SVFTNode):
        return use.dense_merged()
    use.record("reference")
    return use.dense(node.reference_kernel())


register_strategy("rebuild", rebuild)
register_strategy("rebuild_remat", rebuild_remat)
register_strategy("factored", factored)
register_strategy("spectral", spectral)
register_strategy("auto", auto)
register_strategy("reference", reference)


def drop_unused_base(adapted):
    """`adapted` without W0 in every node that no strategy `auto` can choose reads it from.

    A full-rank SVFT node with float32 (or wider) factors has W0 = U Σ Vᵀ to SVD rounding, and
    for it `auto` only ever picks rebuild (which then forms U (Σ + M) Vᵀ) or spectral: factored,
    the one strategy that multiplies by W0, costs more than spectral at full rank for every T
    (`cost.py`). So W0 — d1·d2 values per target, as large as the model — need not be kept;
    this returns the tree with `base=None` (and `keep_base=False` in the node's plan, so
    adapter files record it). The decision does not depend on the token count.

    Kept: truncated-rank nodes (their residual W0 − U_r Σ_r V_rᵀ is part of W), nodes with
    bfloat16/float16 factors (U Σ Vᵀ in bfloat16 is W0 only to ~4e-3; `apply(keep_base=False)`
    warns for that), and every non-SVFT node.

    Args: adapted: a tree from `svft_jax.apply` (trainable and frozen halves combined).
    Returns: the same tree, full-rank float32 SVFT nodes without W0 (equal to
      `svft_jax.apply(..., keep_base=False)` on the same params).
    """
    import dataclasses

    from svft_jax.transform._protocol import is_node

    def drop(node):
        if not (isinstance(node, SVFTNode) and node.base is not None and node.meta.full_rank):
            return node
        if jnp.dtype(node.u.dtype).itemsize < 4:
            return node
        meta = dataclasses.replace(node.meta, plan=dataclasses.replace(node.meta.plan, keep_base=False))
        return dataclasses.replace(node, base=None, meta=meta)

    return jax.tree.map(drop, adapted, is_leaf=is_node)
