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

A factor store is any Mapping from `factor_key(...)` to (u, s, v): `apply(..., factors=store)`
looks each target up before computing its SVD and writes what it computes into a mutable one;
`svft_jax.checkpoint.load_factor_cache(path)` is a store backed by a file.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, MutableMapping

import jax
import jax.numpy as jnp
import numpy as np

SVD_DTYPES = ("float32", "float64")
SVD_BACKENDS = ("auto", "jax", "numpy", "randomized")
RANDOMIZED_OVERSAMPLES = 10
RANDOMIZED_POWER_ITERATIONS = 4



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


def factor_key(matrix, rank: int, svd_dtype: str, backend: str) -> str:
    """The factor-store key of one target: a digest of what determines its factors — the
    matrix bytes, shape and dtype, the rank, the SVD dtype and the resolved back-end."""
    array = np.ascontiguousarray(np.asarray(matrix))
    digest = hashlib.sha256(array.tobytes())
    digest.update(repr((array.shape, array.dtype.str, int(rank), svd_dtype, backend)).encode())
    return digest.hexdigest()


def factorize(plans, kernels, store: Mapping | None = None, *, batch: int = 16, progress: bool = False):
    """SVDs of all targets, same-shaped matrices batched together: {path: (u, s, v)}.

    Args:
      plans: SVFT plans (path, layout, rank, svd_backend, svd_dtype).
      kernels: {path: original kernel}.
      store: a factor store (any Mapping from `factor_key` to (u, s, v)); factors found there
        are not recomputed, and computed ones are written back when it is a MutableMapping.
      batch: matrices per batched SVD call (LAPACK in a loop on the host, or one XLA call).
    """
    factors, keys = {}, {}
    if store is not None:
        for plan in plans:
            matrix = plan.layout.to_matrix(np.asarray(kernels[plan.path]))
            keys[plan.path] = factor_key(matrix, plan.rank, plan.svd_dtype, plan.svd_backend)
            if keys[plan.path] in store:
                factors[plan.path] = tuple(store[keys[plan.path]])
    groups: dict[tuple, list] = {}
    for plan in plans:
        if plan.path in factors:
            continue
        key = (plan.layout.d1, plan.layout.d2, plan.rank, jnp.dtype(kernels[plan.path].dtype).name,
               plan.svd_backend, plan.svd_dtype)
        groups.setdefault(key, []).append(plan)
    chunks = [group[i : i + batch] for group in groups.values() for i in range(0, len(group), batch)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="SVFT: SVD", unit="batch")
    writable = isinstance(store, MutableMapping)
    for chunk in chunks:
        first = chunk[0]
        on_host = first.svd_backend == "numpy" or (first.svd_dtype == "float64" and not jax.config.read("jax_enable_x64"))
        xp = np if on_host else jnp  # keep host SVDs on the host: no device round trip per matrix
        d1, d2 = first.layout.d1, first.layout.d2
        matrices = [plan.layout.to_matrix(xp.asarray(kernels[plan.path])).reshape(-1, d1, d2) for plan in chunk]
        sizes = [m.shape[0] for m in matrices]
        u, s, v = svd_factors(xp.concatenate(matrices), first.rank, first.svd_dtype, first.svd_backend, seed=first.key[0])
        offsets = np.cumsum([0, *sizes])
        for plan, lo, hi in zip(chunk, offsets[:-1], offsets[1:], strict=True):
            stack = plan.layout.stack_shape
            factors[plan.path] = (u[lo:hi].reshape(*stack, d1, plan.rank), s[lo:hi].reshape(*stack, plan.rank),
                                  v[lo:hi].reshape(*stack, d2, plan.rank))
            if writable:
                store[keys[plan.path]] = tuple(np.asarray(x) for x in factors[plan.path])
    return factors
