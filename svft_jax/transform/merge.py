"""Dense weights from SVFT nodes: W = W0 + U M Vᵀ, built from sparse M without an r×r matrix."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax.transform.node import SVFTNode, is_node, pattern_spec

_HIGHEST = jax.lax.Precision.HIGHEST


def gather_left_product(u, coeffs, rows, cols, sorted_cols: bool = False):
    """U M for a general sparse M via gather + segment_sum.

    Column j of U M is Σ_{(i, j) ∈ Ω} M_ij u_i.
    Args:
      u: (d1, r); coeffs: (n,) values of M on Ω; rows, cols: (n,) int indices.
    Returns:
      (d1, r).
    """
    contributions = u[:, rows] * coeffs  # (d1, n)
    summed = jax.ops.segment_sum(
        contributions.T, cols, num_segments=u.shape[-1], indices_are_sorted=sorted_cols
    )
    return summed.T


def left_product(node: SVFTNode, u=None, coeffs=None):
    """U M for every layer of a node, in float32: (*stack, d1, r).

    Uses the pattern's structured product when it has one (plain, banded), else
    gather/segment_sum; layers of a stacked kernel are vmapped.
    """
    meta = node.meta
    spec = pattern_spec(node)
    u = jnp.asarray(node.u if u is None else u, jnp.float32)
    coeffs = jnp.asarray(node.coefficients() if coeffs is None else coeffs, jnp.float32)
    stack = meta.layout.stack_shape
    rows, cols = meta.rows.array, meta.cols.array

    if spec.left_product is not None:
        def one_layer(u_layer, c_layer, rows_layer, cols_layer):
            return spec.left_product(u_layer, c_layer, rows_layer, cols_layer, meta.options)
    else:
        sorted_cols = bool(np.all(np.diff(cols, axis=-1) >= 0))

        def one_layer(u_layer, c_layer, rows_layer, cols_layer):
            return gather_left_product(u_layer, c_layer, rows_layer, cols_layer, sorted_cols)

    if not stack:
        return one_layer(u, coeffs, rows, cols)
    layers = math.prod(stack)
    u_flat = u.reshape(layers, *u.shape[len(stack):])
    c_flat = coeffs.reshape(layers, -1)
    if meta.per_layer_indices:
        rows_flat = jnp.asarray(rows.reshape(layers, -1))
        cols_flat = jnp.asarray(cols.reshape(layers, -1))
        out = jax.vmap(one_layer)(u_flat, c_flat, rows_flat, cols_flat)
    else:
        out = jax.vmap(lambda a, b: one_layer(a, b, rows, cols))(u_flat, c_flat)
    return out.reshape(*stack, *out.shape[1:])


def weight_matrix(node: SVFTNode):
    """The adapted W in the paper's orientation, float32: (*stack, d1, d2)."""
    um = left_product(node)
    v = jnp.asarray(node.v, jnp.float32)
    if node.base is None:  # full-rank factors stand in for W0: W = (U diag(s) + U M) Vᵀ
        um = um + jnp.asarray(node.u, jnp.float32) * jnp.asarray(node.s, jnp.float32)[..., None, :]
        return jnp.matmul(um, jnp.swapaxes(v, -1, -2), precision=_HIGHEST)
    w0 = node.meta.layout.to_matrix(jnp.asarray(node.base, jnp.float32))
    return w0 + jnp.matmul(um, jnp.swapaxes(v, -1, -2), precision=_HIGHEST)


def delta_matrix(node: SVFTNode):
    """ΔW = U M Vᵀ, float32: (*stack, d1, d2)."""
    um = left_product(node)
    v = jnp.asarray(node.v, jnp.float32)
    return jnp.matmul(um, jnp.swapaxes(v, -1, -2), precision=_HIGHEST)


def merged_kernel(node: SVFTNode):
    """The adapted kernel in its original layout and dtype."""
    layout = node.meta.layout
    return layout.from_matrix(weight_matrix(node)).astype(layout.dtype)


def merge(adapted):
    """Replace every SVFT node by its dense kernel.

    Args:
      adapted: a pytree from `svft_jax.apply` (or `combine`).
    Returns:
      A plain parameter pytree with the structure and dtypes of the original `params`, which
      the unmodified model's `apply` accepts. Differentiable and jit-able.
    """
    return jax.tree_util.tree_map(
        lambda x: x.merged_kernel() if is_node(x) else x, adapted, is_leaf=is_node
    )
