"""Factored matmuls: y = x Wᵀ for an adapted W without forming W, one function per node type.

A node type gets factored execution by defining a `factored_matmul(x, *, precision,
preferred_element_type)` method and a `factored_rank` property, or by being registered here
with `register_factored` (the method wins). Node types with neither are always merged.
All matrices are in the paper's orientation: x: (..., d2) -> y: (..., d1).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from svft_jax.transform.merge import left_product
from svft_jax.transform.node import SVFTNode

_FACTORED: dict[type, tuple[Callable, Callable]] = {}


def register_factored(node_type: type, matmul: Callable, rank: Callable) -> None:
    """Register `matmul(node, x, *, precision, preferred_element_type) -> y` and
    `rank(node) -> int` (the rank of ΔW, read by the auto cost model) for `node_type`."""
    _FACTORED[node_type] = (matmul, rank)


def _lazy_register_baselines() -> None:
    """Register LoRA/DoRA/VeRA once svft_jax.baselines can be imported (it is optional)."""
    if getattr(_lazy_register_baselines, "done", False):
        return
    _lazy_register_baselines.done = True
    try:
        from svft_jax.baselines import DoRANode, LoRANode, VeRANode
    except ImportError:  # pragma: no cover - baselines not installed
        return
    register_factored(LoRANode, lora_matmul, lambda node: node.meta.rank)
    register_factored(VeRANode, vera_matmul, lambda node: node.meta.rank)
    register_factored(DoRANode, dora_matmul, lambda node: node.meta.rank)


def factored_for(node) -> tuple[Callable, Callable] | None:
    """(matmul, rank) for a node, or None when it can only be merged."""
    method = getattr(type(node), "factored_matmul", None)
    if method is not None:
        return (lambda n, x, **kw: n.factored_matmul(x, **kw)), (lambda n: int(n.factored_rank))
    _lazy_register_baselines()
    for klass in type(node).__mro__:
        if klass in _FACTORED:
            return _FACTORED[klass]
    return None


def _mm(x, w, precision, preferred_element_type):
    """x (..., k) @ w (k, n) in x's dtype, accumulated in `preferred_element_type` (float32 for
    bfloat16 inputs, so factors stored in bfloat16 lose nothing in the sums)."""
    w = jnp.asarray(w, x.dtype)
    accumulate = preferred_element_type or (jnp.float32 if x.dtype == jnp.bfloat16 else None)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=accumulate)


def base_matmul(base, layout, x, precision=None, preferred_element_type=None):
    """x W0ᵀ straight from the kernel: (..., d2) -> (..., d1).

    x's last axis is unflattened into the kernel's input axes and contracted with them in one
    dot_general, as the model's own layer does, so W0 is never transposed or copied.
    """
    in_shape = tuple(layout.shape[a] for a in layout.in_axes)
    lead = x.shape[:-1]
    x = x.reshape(*lead, *in_shape)
    contract_x = tuple(range(len(lead), x.ndim))
    kernel = jnp.asarray(base, x.dtype)
    accumulate = preferred_element_type or (jnp.float32 if x.dtype == jnp.bfloat16 else None)
    y = jax.lax.dot_general(x, kernel, ((contract_x, tuple(layout.in_axes)), ((), ())),
                            precision=precision, preferred_element_type=accumulate)
    # y's trailing axes are the kernel's free axes in increasing order; W's d1 follows out_axes.
    free = sorted(layout.out_axes)
    order = [len(lead) + free.index(a) for a in layout.out_axes]
    if order != sorted(order):
        y = jnp.transpose(y, (*range(len(lead)), *order))
    return y.reshape(*lead, layout.d1)


def svft_matmul(node: SVFTNode, x, *, precision=None, preferred_element_type=None):
    """x Wᵀ for W = W0 + U M Vᵀ (or U (Σ + M) Vᵀ without W0), as x W0ᵀ + (x V)(U M)ᵀ.

    U M (d1 × r) comes from the pattern's structured left product (banded: 2d+1 shifted
    slices; plain: a column scale; random/top-k: gather + segment_sum), so no dense r × r M
    is formed and the gradient of m is computed on Ω only. x V is the residual that the
    backward pass reuses for the gradient of M, so a step costs about LoRA of rank r.

    Args:
      node: an unstacked SVFTNode (u: (d1, r), v: (d2, r), m: (|Ω|,)).
      x: (..., d2).
    Returns:
      (..., d1).
    """
    um = left_product(node)  # (d1, r) float32
    if node.base is None:
        um = um + jnp.asarray(node.u, jnp.float32) * jnp.asarray(node.s, jnp.float32)[..., None, :]
    h = _mm(x, node.v, precision, preferred_element_type)  # (..., r)
    y = _mm(h.astype(x.dtype), jnp.swapaxes(um, -1, -2), precision, preferred_element_type)
    if node.base is not None:
        y = y + base_matmul(node.base, node.meta.layout, x, precision, preferred_element_type)
    return y


def lora_matmul(node, x, *, precision=None, preferred_element_type=None):
    """x W0ᵀ + (α/r) (x Aᵀ) Bᵀ. a: (r, d2), b: (d1, r)."""
    h = _mm(x, jnp.swapaxes(node.a, -1, -2), precision, preferred_element_type)
    delta = _mm(h.astype(x.dtype), jnp.swapaxes(node.b, -1, -2), precision, preferred_element_type)
    return base_matmul(node.base, node.meta.layout, x, precision, preferred_element_type) + node.meta.scaling * delta


def vera_matmul(node, x, *, precision=None, preferred_element_type=None):
    """x W0ᵀ + Λ_b B Λ_d A x: ((x Aᵀ) ⊙ d) Bᵀ ⊙ b. shared_a: (r, d2), shared_b: (d1, r)."""
    h = _mm(x, jnp.swapaxes(node.shared_a, -1, -2), precision, preferred_element_type)
    h = (h * jnp.asarray(node.scale_d, h.dtype)).astype(x.dtype)
    delta = _mm(h, jnp.swapaxes(node.shared_b, -1, -2), precision, preferred_element_type)
    delta = delta * jnp.asarray(node.scale_b, delta.dtype)
    return base_matmul(node.base, node.meta.layout, x, precision, preferred_element_type) + delta


def dora_matmul(node, x, *, precision=None, preferred_element_type=None):
    """(m / ‖W0 + s B A‖_row) ⊙ (x W0ᵀ + s (x Aᵀ) Bᵀ), s = α/r.

    The row norms come from ‖w0_i‖² + 2 s b_i·(A w0_i) + s² b_i (A Aᵀ) b_iᵀ (W0 Aᵀ costs
    d1·d2·r, as a merge would, but W is never stored). Detached like the node's merge when
    `meta.detach_norm`.
    """
    scale = node.meta.scaling
    w0 = node.meta.layout.to_matrix(jnp.asarray(node.base, jnp.float32))  # (d1, d2), a view
    a = jnp.asarray(node.a, jnp.float32)
    b = jnp.asarray(node.b, jnp.float32)
    w0_at = w0 @ a.T  # (d1, r)
    squared = (jnp.sum(w0 * w0, axis=-1) + 2 * scale * jnp.sum(b * w0_at, axis=-1)
               + scale**2 * jnp.sum((b @ (a @ a.T)) * b, axis=-1))
    norm = jnp.sqrt(jnp.maximum(squared, 0.0))
    if node.meta.detach_norm:
        norm = jax.lax.stop_gradient(norm)
    h = _mm(x, a.T, precision, preferred_element_type)
    y = base_matmul(node.base, node.meta.layout, x, precision, preferred_element_type)
    y = y + scale * _mm(h.astype(x.dtype), b.T, precision, preferred_element_type)
    return y * (jnp.asarray(node.magnitude, jnp.float32) / norm).astype(y.dtype)


register_factored(SVFTNode, svft_matmul, lambda node: node.meta.rank)
