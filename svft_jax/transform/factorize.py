"""Thin SVD of (stacks of) weight matrices, with canonical signs.

Singular vectors are unique only up to a joint sign flip (u_i, v_i) -> (−u_i, −v_i), and
LAPACK, XLA:CPU, cuSOLVER and TPU routines pick differently. We flip each pair so that the
largest-magnitude entry of u_i is positive (the first such entry on ties); then an adapter
saved on one back-end means the same update on another (for distinct singular values).

Back-ends (`svd_backend=` of `svft_jax.apply`):
  "auto"        numpy/LAPACK when JAX's default device is the CPU (XLA:CPU's SVD is several
                times slower than LAPACK's divide-and-conquer gesdd; see
                experiments/results/bench_apply.md), else "jax" on the accelerator.
  "jax"         XLA's SVD on the default device.
  "numpy"       LAPACK on the host.
  "randomized"  for a truncated rank < min(d1, d2): a randomized range finder (Halko,
                Martinsson & Tropp 2011, Alg. 4.4: `rank + 10` Gaussian probes, 4 QR-stabilised
                power iterations) in JAX, then an exact SVD of the small projected matrix.
                Approximate (the top singular triplets to ~1e-3 relative for matrices with a
                decaying spectrum); W0 stays frozen beside the factors when rank < min(d1, d2),
                so M = 0 still reproduces W0 exactly. Falls back to "auto" at full rank.

A factor cache can be installed with `svd_cache(mapping)`: while it is active, `apply` looks
each target's factors up by a digest of the kernel's bytes, rank, dtype and back-end before
computing them, and stores what it computes (a checkpoint engineer may back it by a file).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import MutableMapping

import jax
import jax.numpy as jnp
import numpy as np

SVD_DTYPES = ("float32", "float64")
SVD_BACKENDS = ("auto", "jax", "numpy", "randomized")
RANDOMIZED_OVERSAMPLES = 10
RANDOMIZED_POWER_ITERATIONS = 4

_ACTIVE_CACHE: list[MutableMapping] = []


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


@functools.partial(jax.jit, static_argnames=("rank", "oversamples", "iterations"))
def _randomized_svd(matrix, key, rank: int, oversamples: int, iterations: int):
    """Top-`rank` triplets of each matrix by a randomized range finder (Halko et al. 2011)."""
    d2 = matrix.shape[-1]
    probes = min(rank + oversamples, min(matrix.shape[-2:]))
    omega = jax.random.normal(key, (*matrix.shape[:-2], d2, probes), matrix.dtype)
    q, _ = jnp.linalg.qr(matrix @ omega)
    for _ in range(iterations):  # power iterations, re-orthonormalised for stability
        z, _ = jnp.linalg.qr(jnp.swapaxes(matrix, -1, -2) @ q)
        q, _ = jnp.linalg.qr(matrix @ z)
    small = jnp.swapaxes(q, -1, -2) @ matrix  # (..., probes, d2)
    u_small, s, vt = jnp.linalg.svd(small, full_matrices=False)
    u = q @ u_small
    v = jnp.swapaxes(vt, -1, -2)
    u, v = canonicalize_signs(u[..., :rank], v[..., :rank])
    return u, s[..., :rank], v


def resolve_backend(backend: str) -> str:
    """"auto" -> "numpy" on a CPU default device, else "jax"; other names unchanged."""
    if backend not in SVD_BACKENDS:
        raise ValueError(f"svd_backend must be one of {SVD_BACKENDS}, got {backend!r}.")
    if backend == "auto":
        return "numpy" if jax.default_backend() == "cpu" else "jax"
    return backend


def svd_factors(matrix, rank: int, svd_dtype: str = "float32", backend: str = "auto", seed: int = 0):
    """Top-`rank` singular triplets of each matrix in a stack, signs canonicalised.

    Args:
      matrix: (..., d1, d2) array (any float dtype; converted to `svd_dtype`).
      rank: number of triplets kept, 1 ≤ rank ≤ min(d1, d2).
      svd_dtype: "float32" (default) or "float64". float64 runs in numpy/LAPACK unless
        `jax_enable_x64` is on.
      backend: "auto" (default), "jax", "numpy" or "randomized" (see the module docstring).
      seed: seeds the probes of the randomized back-end.
    Returns:
      u: (..., d1, rank), s: (..., rank), v: (..., d2, rank), with
      matrix ≈ u diag(s) vᵀ when rank = min(d1, d2).
    """
    if svd_dtype not in SVD_DTYPES:
        raise ValueError(f"svd_dtype must be one of {SVD_DTYPES}, got {svd_dtype!r}.")
    backend = resolve_backend(backend)
    x64 = jax.config.read("jax_enable_x64")
    if backend == "randomized":
        if rank < min(matrix.shape[-2:]) and (svd_dtype == "float32" or x64):
            return _randomized_svd(jnp.asarray(matrix, dtype=svd_dtype), jax.random.key(seed), rank,
                                   RANDOMIZED_OVERSAMPLES, RANDOMIZED_POWER_ITERATIONS)
        backend = resolve_backend("auto")
    if backend == "numpy" or (svd_dtype == "float64" and not x64):
        return _numpy_svd(np.asarray(matrix, dtype=np.dtype(svd_dtype)), rank)
    return _jax_svd(jnp.asarray(matrix, dtype=svd_dtype), rank)


@contextlib.contextmanager
def svd_cache(cache: MutableMapping):
    """Within the block, `svft_jax.apply` reads and writes factors in `cache`.

    Args:
      cache: any mutable mapping from `factor_cache_key(...)` strings to (u, s, v) numpy
        arrays (a dict, or a file-backed mapping: the values are plain numpy arrays).
    """
    _ACTIVE_CACHE.append(cache)
    try:
        yield cache
    finally:
        _ACTIVE_CACHE.pop()


def active_svd_cache() -> MutableMapping | None:
    """The innermost cache installed with `svd_cache`, or None."""
    return _ACTIVE_CACHE[-1] if _ACTIVE_CACHE else None


def factor_cache_key(matrix, rank: int, svd_dtype: str, backend: str) -> str:
    """A digest of what determines a target's factors: the matrix bytes, shape and dtype,
    the rank, the SVD dtype and the (resolved) back-end."""
    array = np.ascontiguousarray(np.asarray(matrix))
    digest = hashlib.sha256(array.tobytes())
    digest.update(repr((array.shape, array.dtype.str, int(rank), svd_dtype, backend)).encode())
    return digest.hexdigest()
