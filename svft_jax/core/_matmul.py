"""Matmul building blocks shared by every method's factored `matmul` (paper orientation:
x: (..., d2) -> y: (..., d1)), and the precision policy of products that rebuild W.

Numerics (the same on every platform):
  * accumulation is float32 whenever an operand is narrower (bfloat16/float16);
  * factors stored in bfloat16 stay bfloat16 in the hot path: the activation is cast down to
    the factor dtype (one pass over T×d values) instead of U and V being cast up to float32
    on every step (`compute_dtype`);
  * products that rebuild W from its factors (SVFT's `delta`/`weight`, `merge`, the
    rebuild strategy) run at `rebuild_precision()`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

#: Default precision of the products that rebuild W = W0 + (U M) Vᵀ (or U (Σ + M) Vᵀ), per
#: platform, when neither the call nor `jax.default_matmul_precision` says otherwise. Inputs are
#: the stored factors; accumulation is float32 everywhere.
#:   cpu: "highest" — CPU dots are float32 anyway, so it costs nothing.
#:   gpu: "highest" — float32 multiplies; TF32 ("default"/"high") has a 10-bit mantissa and
#:        would move a rebuilt U (Σ + M) Vᵀ away from W0 by ~1e-3 relative.
#:   tpu: "high" — three bfloat16 passes (≈ float32 to ~1e-6 relative), half the cost of
#:        "highest"'s six; "default" (one bfloat16 pass) would move W by ~4e-3.
#: Set `jax.default_matmul_precision(...)` (JAX's own config/context manager) to override it
#: for everything, or pass `precision=` to `delta`/`weight` for one call.
REBUILD_PRECISION = {"cpu": "highest", "gpu": "highest", "tpu": "high"}


def rebuild_precision(precision=None):
    """The precision for a product that rebuilds W: `precision` if given; None (XLA follows
    JAX's `default_matmul_precision` setting) when the user set one; else the platform's
    entry of `REBUILD_PRECISION`."""
    if precision is not None:
        return precision
    if jax.config.jax_default_matmul_precision is not None:
        return None
    return jax.lax.Precision(REBUILD_PRECISION.get(jax.default_backend(), "highest"))


def rebuild_matmul(a, b_t, precision=None):
    """a (*stack, d1, r) float32 times b_tᵀ for stored factors b_t (*stack, d2, r): (*stack, d1, d2) float32.

    With float32 factors, one float32 matmul. With half-precision factors the product stays in
    the factors' dtype (float32 accumulation), and a — derived in float32 from the stored
    factors (U M, or U (Σ + M)) — is split into a high and a low half-precision part,
    a ≈ hi + lo, multiplied in two passes: the result matches the float32 product of the
    stored factors to ~2⁻¹⁶ relative instead of bfloat16's 2⁻⁸, at twice a bfloat16
    matmul's cost (still well below one float32 matmul on GPUs/TPUs).
    """
    dtype = jnp.dtype(b_t.dtype)
    b = jnp.swapaxes(b_t, -1, -2)
    if dtype.itemsize >= 4:
        return jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), precision=precision,
                          preferred_element_type=jnp.float32)
    hi = a.astype(dtype)
    lo = (a - hi.astype(a.dtype)).astype(dtype)
    return (jnp.matmul(hi, b, precision=precision, preferred_element_type=jnp.float32)
            + jnp.matmul(lo, b, precision=precision, preferred_element_type=jnp.float32))


def accumulation_dtype(dtype, preferred_element_type=None):
    """float32 accumulation for bfloat16/float16 inputs unless told otherwise."""
    if preferred_element_type is not None:
        return preferred_element_type
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else None


def compute_dtype(x_dtype, factor_dtype):
    """The operand dtype of a product of an activation with stored factors: the narrower of
    the two floating dtypes (bfloat16 factors keep bfloat16 matmuls; accumulation is float32)."""
    x_dtype, factor_dtype = jnp.dtype(x_dtype), jnp.dtype(factor_dtype)
    return factor_dtype if factor_dtype.itemsize < x_dtype.itemsize else x_dtype


def _dot(x, w, precision, preferred_element_type):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _narrow_dot(x, w, precision, preferred_element_type):
    return _dot(x, w, precision, preferred_element_type)


def _narrow_dot_fwd(x, w, precision, preferred_element_type):
    return _dot(x, w, precision, preferred_element_type), (x, w)


def _narrow_dot_bwd(precision, preferred_element_type, residuals, g):
    # Autodiff would multiply the float32 cotangent by the bfloat16 factor (a mixed dot that
    # XLA runs in float32, upcasting the factor every step); round g to the operand dtype instead.
    x, w = residuals
    g = g.astype(x.dtype)
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=preferred_element_type).astype(x.dtype)
    lead = tuple(range(x.ndim - 1))
    dw = jax.lax.dot_general(x, g, ((lead, lead), ((), ())), precision=precision,
                             preferred_element_type=preferred_element_type).astype(w.dtype)
    return dx, dw


_narrow_dot.defvjp(_narrow_dot_fwd, _narrow_dot_bwd)


def mm(x, w, precision=None, preferred_element_type=None):
    """x (..., k) @ w (k, n) in x's dtype, accumulated in float32 for half-precision inputs, so
    factors stored in bfloat16 lose nothing in the sums. For half-precision operands the
    backward products are half precision too (float32 accumulation), never mixed."""
    w = jnp.asarray(w, x.dtype)
    accumulate = accumulation_dtype(x.dtype, preferred_element_type)
    if jnp.dtype(x.dtype).itemsize < 4:
        return _narrow_dot(x, w, precision, accumulate)
    return _dot(x, w, precision, accumulate)


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
