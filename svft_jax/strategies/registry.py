"""Execution strategies: functions `(node, use: KernelUse) -> y`, registered by name.

  rebuild    merge W once per call (cached across uses), then the model's own dense dot.
  factored   x ↦ x W0ᵀ + (x V)(U M)ᵀ via the node type's factored matmul; never forms W.
             Node types without one, stacked kernels and dots that do not contract W's
             input axes are rebuilt instead.
  auto       per target and call: `choose_strategy(d1, d2, rank, tokens)` (see `cost.py`).
  reference  what the SVFT authors' layer does: densify M (r × r), rebuild U (Σ + M) Vᵀ
             (or W0 + U M Vᵀ) on every use, no caching. For benchmarks.

A new strategy is one function registered with `register_strategy(name, fn)`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from svft_jax.strategies.cost import choose_strategy
from svft_jax.strategies.factored import factored_for
from svft_jax.transform.node import SVFTNode

_STRATEGIES: dict[str, Callable] = {}


def register_strategy(name: str, fn: Callable) -> Callable:
    """Add a strategy `fn(node, use) -> y` under `name` (an existing name is an error)."""
    if name in _STRATEGIES:
        raise ValueError(f"A strategy named {name!r} is already registered.")
    _STRATEGIES[name] = fn
    return fn


def get_strategy(name: str) -> Callable:
    """The strategy called `name`; ValueError listing the known names otherwise."""
    if not isinstance(name, str) or name not in _STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; choose one of: {', '.join(available_strategies())}.")
    return _STRATEGIES[name]


def available_strategies() -> tuple[str, ...]:
    return tuple(sorted(_STRATEGIES))


def rebuild(node, use):
    """Merge once per call (memoised on the kernel), then the original dense dot."""
    return use.dense_merged()


def rebuild_remat(node, use):
    """Like `rebuild`, but W is recomputed in the backward pass instead of being kept from
    forward to backward (jax.checkpoint): one d1×d2 buffer less per layer at peak, for one
    extra merge (d1·d2·r) per step."""

    def run(node, x):
        return use.with_x(x).dense(node.merged_kernel())

    use.record("rebuild_remat")
    return jax.checkpoint(run)(node, use.x)


def factored(node, use):
    """Never form W: the node type's factored matmul on x reshaped to (..., d2)."""
    found = factored_for(node)
    if found is None or not use.matrix_form:
        return use.dense_merged()
    matmul, _ = found
    use.record("factored")
    y = matmul(node, use.input_matrix(), precision=use.precision, preferred_element_type=None)
    return use.output_from_matrix(y)


def auto(node, use):
    """Rebuild or factored for this target, whichever the FLOP model says is cheaper."""
    found = factored_for(node)
    if found is None or not use.matrix_form:
        return use.dense_merged()
    _, rank = found
    layout = use.layout
    has_base = getattr(node, "base", None) is not None
    choice = choose_strategy(layout.d1, layout.d2, rank(node), use.tokens, has_base=has_base)
    return factored(node, use) if choice == "factored" else rebuild(node, use)


def reference_kernel(node: SVFTNode):
    """The authors' forward: dense M from its sparse values, W = U (Σ + M) Vᵀ (+ W0 − UΣVᵀ
    when W0 is kept), in the kernel's layout."""
    layout = node.meta.layout
    dense_m = node.dense_coefficients()  # (*stack, r, r)
    u = jnp.asarray(node.u, jnp.float32)
    v = jnp.asarray(node.v, jnp.float32)
    if node.base is None:
        core = dense_m + jnp.eye(node.meta.rank) * jnp.asarray(node.s, jnp.float32)[..., None, :]
        w = (u @ core) @ jnp.swapaxes(v, -1, -2)
    else:
        w = layout.to_matrix(jnp.asarray(node.base, jnp.float32)) + (u @ dense_m) @ jnp.swapaxes(v, -1, -2)
    return layout.from_matrix(w).astype(layout.dtype)


def reference(node, use):
    """SVFT's reference layer: rebuild W from a dense M on every use (no caching)."""
    if not isinstance(node, SVFTNode):
        return use.dense_merged()
    use.record("reference")
    return use.dense(reference_kernel(node))


register_strategy("rebuild", rebuild)
register_strategy("rebuild_remat", rebuild_remat)
register_strategy("factored", factored)
register_strategy("auto", auto)
register_strategy("reference", reference)
