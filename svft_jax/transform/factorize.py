"""Thin SVD of (stacks of) weight matrices, with canonical signs.

Singular vectors are unique only up to a joint sign flip (u_i, v_i) -> (−u_i, −v_i), and
LAPACK, XLA:CPU, cuSOLVER and TPU routines pick differently. We flip each pair so that the
largest-magnitude entry of u_i is positive (the first such entry on ties); then an adapter
saved on one back-end means the same update on another (for distinct singular values).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SVD_DTYPES = ("float32", "float64")


def canonicalize_signs(u, v):
    """Flip (u_i, v_i) so that u_i's largest-magnitude entry is positive.

    Args:
      u: (..., d1, r) left singular vectors; v: (..., d2, r) right singular vectors.
    Returns:
      (u, v) with the same shapes; u diag(s) vᵀ is unchanged.
    """
    xp = jnp if isinstance(u, jax.Array) else np
    pivot = xp.argmax(xp.abs(u), axis=-2)[..., None, :]
    sign = xp.sign(xp.take_along_axis(u, pivot, axis=-2))
    sign = xp.where(sign == 0, 1, sign).astype(u.dtype)
    return u * sign, v * sign


@functools.partial(jax.jit, static_argnames=("rank",))
def _jax_svd(matrix, rank: int):
    u, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
    v = jnp.swapaxes(vt, -1, -2)
    u, v = canonicalize_signs(u[..., :rank], v[..., :rank])
    return u, s[..., :rank], v


def _numpy_svd(matrix: np.ndarray, rank: int):
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    v = np.swapaxes(vt, -1, -2)
    u, v = canonicalize_signs(u[..., :rank], v[..., :rank])
    return u, s[..., :rank], v


def svd_factors(matrix, rank: int, svd_dtype: str = "float32", backend: str = "jax"):
    """Top-`rank` singular triplets of each matrix in a stack, signs canonicalised.

    Args:
      matrix: (..., d1, d2) array (any float dtype; converted to `svd_dtype`).
      rank: number of triplets kept, 1 ≤ rank ≤ min(d1, d2).
      svd_dtype: "float32" (default) or "float64". float64 runs in numpy/LAPACK unless
        `jax_enable_x64` is on.
      backend: "jax" (XLA's SVD, on the default device) or "numpy" (LAPACK on the host).
    Returns:
      u: (..., d1, rank), s: (..., rank), v: (..., d2, rank), with
      matrix ≈ u diag(s) vᵀ when rank = min(d1, d2).
    """
    if svd_dtype not in SVD_DTYPES:
        raise ValueError(f"svd_dtype must be one of {SVD_DTYPES}, got {svd_dtype!r}.")
    x64 = jax.config.read("jax_enable_x64")
    if backend == "numpy" or (svd_dtype == "float64" and not x64):
        return _numpy_svd(np.asarray(matrix, dtype=np.dtype(svd_dtype)), rank)
    if backend != "jax":
        raise ValueError(f"backend must be 'jax' or 'numpy', got {backend!r}.")
    return _jax_svd(jnp.asarray(matrix, dtype=svd_dtype), rank)
