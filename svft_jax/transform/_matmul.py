"""Matmul building blocks shared by every method's factored `matmul` (paper orientation:
x: (..., d2) -> y: (..., d1))."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def accumulation_dtype(dtype, preferred_element_type=None):
    """float32 accumulation for bfloat16/float16 inputs unless told otherwise."""
    if preferred_element_type is not None:
        return preferred_element_type
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else None


def mm(x, w, precision=None, preferred_element_type=None):
    """x (..., k) @ w (k, n) in x's dtype, accumulated in float32 for half-precision inputs, so
    factors stored in bfloat16 lose nothing in the sums."""
    w = jnp.asarray(w, x.dtype)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=accumulation_dtype(x.dtype, preferred_element_type))


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
    y = jax.lax.dot_general(x, kernel, ((contract_x, tuple(layout.in_axes)), ((), ())), precision=precision,
                            preferred_element_type=accumulation_dtype(x.dtype, preferred_element_type))
    # y's trailing axes are the kernel's free axes in increasing order; W's d1 follows out_axes.
    free = sorted(layout.out_axes)
    order = [len(lead) + free.index(a) for a in layout.out_axes]
    if order != sorted(order):
        y = jnp.transpose(y, (*range(len(lead)), *order))
    return y.reshape(*lead, layout.d1)
