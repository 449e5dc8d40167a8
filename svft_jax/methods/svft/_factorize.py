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
import math
from collections.abc import Mapping, MutableMapping

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax.core._protocol import factor_key as factor_key  # noqa: PLC0414  (its home before issue 19)

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
    u, v = u[..., :rank], np.swapaxes(vt, -1, -2)[..., :rank]
    # Signs in place (the arrays are fresh): no second copy of the factors.
    pivot = np.argmax(np.abs(u), axis=-2)[..., None, :]
    sign = np.sign(np.take_along_axis(u, pivot, axis=-2))
    sign[sign == 0] = 1
    u *= sign
    v *= sign
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


def factorize(plans, kernels, store: Mapping | None = None, *, batch: int = 16, progress: bool = False):
    """SVDs of all targets, same-shaped matrices batched together: {path: (u, s, v)}.

    Args:
      plans: SVFT plans (path, layout, rank, svd_backend, svd_dtype).
      kernels: {path: original kernel}.
      store: a factor store (any Mapping from `factor_key` to (u, s, v)); factors found there
        are not recomputed, and computed ones are written back when it is a MutableMapping.
      batch: matrices per batched SVD call (LAPACK in a loop on the host, or one XLA call).
    """
    return {plan.path: triple for chunk in factor_chunks(plans, kernels, store, batch=batch, progress=progress)
            for plan, triple in chunk}


def _group_key(plan, kernel) -> tuple:
    return (plan.layout.d1, plan.layout.d2, plan.rank, jnp.dtype(kernel.dtype).name, plan.svd_backend, plan.svd_dtype)


def _host_array(x) -> np.ndarray:
    """A host copy of a (possibly sharded, possibly multi-process) array."""
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _mesh_factors_lossless(plan) -> bool:
    """Whether the mesh path's factors of `plan` are the SVD's own (svd_dtype, unrounded)."""
    computed = plan.svd_dtype if jax.config.read("jax_enable_x64") else "float32"
    return jnp.dtype(plan.factor_dtype) == jnp.dtype(computed) == jnp.dtype(plan.svd_dtype)


# ---- what a factor store hands out -------------------------------------------------------

STORE_PROBES = 4


def store_source(store, key: str) -> str:
    """Words naming where `store` keeps `key` (a cache file's path), for error messages."""
    source = getattr(store, "source", None)
    if callable(source):
        return source(key)
    return f"the factor store passed as factors= (a {type(store).__name__})"


def factor_tolerance(layout, svd_dtype: str) -> float:
    """How far a correct SVD's factors may miss the kernel: relative to ‖W‖_F in the probes of
    `check_stored_factors` (LAPACK and XLA measure 1e-9 to 2e-6 in float32 up to 2048×768;
    wrong factors miss by ~1/√min(d1, d2) or more)."""
    return max(20.0 * math.sqrt(max(layout.d1, layout.d2)) * float(np.finfo(np.dtype(svd_dtype)).eps),
               100.0 * float(np.finfo(np.dtype(svd_dtype)).eps))


def check_stored_factors(plan, matrix, entry, source: str):
    """The (u, s, v) a factor store handed out for `plan`, checked against the kernel's matrix.

    A store entry is trusted only when it is what the SVD of this kernel gives: a triple of
    svd_dtype arrays of the plan's shapes (rank included), finite, with a non-negative,
    non-increasing s and canonical signs, whose singular vectors are orthonormal and satisfy
    Wᵀ U = V diag(s) and (exact back-ends) W V = U diag(s) to the SVD's tolerance — checked on
    seeded probes, layer by layer in float64 (a few matrix-vector products, not an SVD). At full
    rank that is U diag(s) Vᵀ = W.

    Args:
      plan: the target's plan (path, layout, rank, svd_dtype, svd_backend).
      matrix: the kernel as (*stack, d1, d2) host array (the bytes its key was made from).
      entry: what the store returned for the key.
      source: words naming the store (`store_source`).
    Returns:
      (u, s, v) host numpy arrays.
    Raises:
      ValueError naming the target, the store and what is wrong, with the fix.
    """
    target = f"target {plan.path!r}"
    fix = ("Rebuild the store from this model's kernels (svft_jax.apply(..., factors={}) then "
           "svft_jax.checkpoint.save_factor_cache), or drop factors= to recompute the SVDs.")
    if not isinstance(entry, tuple | list) or len(entry) != 3:
        got = f"a {type(entry).__name__}" + (f" of length {len(entry)}" if isinstance(entry, tuple | list) else "")
        raise ValueError(f"{source}: the entry for {target} is malformed: expected a (u, s, v) triple, got {got}. {fix}")
    arrays = []
    for name, value in zip("usv", entry, strict=True):
        try:
            array = _host_array(value)
        except Exception as err:  # anything numpy cannot read as an array
            raise ValueError(f"{source}: the entry for {target} is malformed: its {name} is not an array ({type(value).__name__}: {err}). {fix}") from err
        if array.dtype == object:
            raise ValueError(f"{source}: the entry for {target} is malformed: its {name} is not an array (a {type(value).__name__}). {fix}")
        if array.dtype != np.dtype(plan.svd_dtype):
            raise ValueError(f"{source}: the entry for {target} holds {name} of dtype {array.dtype}, but its key stands for an SVD in svd_dtype={plan.svd_dtype!r}, which computes {plan.svd_dtype} factors (a rounded or foreign copy). {fix}")
        arrays.append(array)
    u, s, v = arrays
    stack, d1, d2, rank = tuple(plan.layout.stack_shape), plan.layout.d1, plan.layout.d2, plan.rank
    expected = {"u": (*stack, d1, rank), "s": (*stack, rank), "v": (*stack, d2, rank)}
    for name, array in zip("usv", arrays, strict=True):
        want = expected[name]
        if array.shape == want:
            continue
        if array.ndim == len(want) and array.shape[:-1] == want[:-1]:
            raise ValueError(f"{source}: the entry for {target} has rank {array.shape[-1]} ({name}: {array.shape}), but the target is adapted at rank {rank} ({name} must be {want}). {fix}")
        raise ValueError(f"{source}: the entry for {target} has {name} of shape {array.shape}; the kernel ({plan.layout.d1}×{plan.layout.d2}, stack {stack}) at rank {rank} needs {want}. {fix}")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError(f"{source}: the entry for {target} contains NaN or Inf. {fix}")
    rtol = factor_tolerance(plan.layout, plan.svd_dtype)
    s64 = s.astype(np.float64)
    top = np.maximum(np.abs(s64[..., :1]), np.finfo(np.float64).tiny)
    if np.any(s64 < 0) or np.any(np.diff(s64, axis=-1) > rtol * top):
        raise ValueError(f"{source}: the entry for {target} is not a singular spectrum (its s is negative or not in non-increasing order), so these are not this kernel's SVD factors. {fix}")
    pivot = np.argmax(np.abs(u), axis=-2)[..., None, :]
    if np.any(np.take_along_axis(u, pivot, axis=-2) < 0):
        raise ValueError(f"{source}: the entry for {target} has singular vectors without the canonical signs every svft-jax SVD gives (largest-magnitude entry of each u_i positive), so it was not made by svft-jax's SVD of this kernel. {fix}")
    generator = np.random.default_rng([d1, d2, rank])
    probes = generator.standard_normal((rank, STORE_PROBES))
    probes /= np.linalg.norm(probes, axis=0)
    norm = math.sqrt(STORE_PROBES)
    exact = plan.svd_backend != "randomized"  # a range finder's V only approximately gives W V = U Σ
    flat = matrix.reshape(-1, d1, d2)
    u, s64, v = u.reshape(-1, d1, rank), s64.reshape(-1, rank), v.reshape(-1, d2, rank)
    for layer in range(flat.shape[0]):
        w = np.asarray(flat[layer], np.float64)
        ul, vl = u[layer].astype(np.float64), v[layer].astype(np.float64)
        scaled = s64[layer][:, None] * probes
        scale = max(float(np.linalg.norm(w)), np.finfo(np.float64).tiny)
        errors = {
            "Wᵀ U = V diag(s)": np.linalg.norm(w.T @ (ul @ probes) - vl @ scaled) / (scale * norm),
            "W V = U diag(s)": np.linalg.norm(w @ (vl @ probes) - ul @ scaled) / (scale * norm) if exact else 0.0,
            "Uᵀ U = I": np.linalg.norm(ul.T @ (ul @ probes) - probes) / norm,
            "Vᵀ V = I": np.linalg.norm(vl.T @ (vl @ probes) - probes) / norm,
        }
        worst = max(errors, key=errors.get)
        if errors[worst] > rtol:
            where = f" (layer {layer} of the stack)" if stack else ""
            raise ValueError(
                f"{source}: the entry for {target} holds wrong factors{where}: they are not the SVD of this kernel "
                f"({worst} misses by {errors[worst]:.3g} relative, the SVD's tolerance is {rtol:.2g}), so "
                f"U diag(s) Vᵀ does not reproduce the kernel and M would act on other directions. The store was "
                f"filled from other weights or edited. {fix}")
    return tuple(arrays)


def factor_chunks(plans, kernels, store: Mapping | None = None, *, batch: int = 16, progress: bool = False,
                  mesh=None, fsdp: bool = False):
    """Stream the factors of all targets, one batched SVD call at a time.

    Yields lists of (plan, (u, s, v)): first the targets found in `store`, then one list per
    batch of same-shaped matrices. Only one batch's factors are alive in this function at a
    time, so a caller that converts and drops them keeps host memory near one batch.

    With `mesh` (a `jax.sharding.Mesh`), each batch holds `batch` matrices per device, is laid
    out over all devices (axis 0 split over every mesh axis) straight from the kernels — host
    kernels through `jax.make_array_from_callback` (each process builds only its devices'
    rows), device kernels (sharded, even non-addressable) through a jitted gather — and each
    device factorises its rows (`shard_map`; LAPACK via `pure_callback` for svd_backend
    "numpy", XLA's SVD for "jax"). The factors are global arrays, replicated over the mesh or
    (fsdp=True) split over its "model" axis, in the plan's factor_dtype. Into a mutable
    `store` each process writes the targets it owns (target index mod process count).
    """
    keys = {}
    if store is not None:
        found = []
        for plan in plans:
            matrix = plan.layout.to_matrix(_host_array(kernels[plan.path]))
            keys[plan.path] = key = factor_key(matrix, plan.rank, plan.svd_dtype, plan.svd_backend)
            if key in store:
                found.append((plan, check_stored_factors(plan, matrix, store[key], store_source(store, key))))
            del matrix
        if found:
            if mesh is not None:
                found = [(plan, _place_factors(plan, triple, mesh, fsdp)) for plan, triple in found]
            yield found
        done = {plan.path for plan, _ in found}
        plans = [plan for plan in plans if plan.path not in done]
    groups: dict[tuple, list] = {}
    for plan in plans:
        groups.setdefault(_group_key(plan, kernels[plan.path]), []).append(plan)
    per_call = batch if mesh is None else batch * mesh.devices.size
    chunks = []
    for group in groups.values():
        current, size = [], 0
        for plan in group:
            layers = plan.layers
            if current and size + layers > per_call:
                chunks.append(current)
                current, size = [], 0
            current.append(plan)
            size += layers
        if current:
            chunks.append(current)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="SVFT: SVD", unit="batch")
    writable = isinstance(store, MutableMapping)
    order = {plan.path: i for i, plan in enumerate(plans)}
    lossy = []
    for chunk in chunks:
        if mesh is None:
            result = _host_chunk(chunk, kernels)
        else:
            result = _mesh_chunk(chunk, kernels, mesh, fsdp)
        if writable:
            for plan, triple in result:
                if mesh is not None and not _mesh_factors_lossless(plan):
                    lossy.append(plan.path)  # only factor_dtype copies exist: not what the SVD computed
                elif mesh is None or order[plan.path] % jax.process_count() == jax.process_index():
                    store[keys[plan.path]] = tuple(_host_array(x) for x in triple)
        yield result
    if lossy:
        import warnings

        warnings.warn(
            f"apply(mesh=..., factors=store): {len(lossy)} target(s) were not written to the factor store (e.g. "
            f"{lossy[0]!r}): over a mesh their factors exist only in factor_dtype, not in the svd_dtype the SVD "
            "computed, and a store must hand out the SVD's own factors. Use factor_dtype=svd_dtype (float32; float64 "
            "needs jax_enable_x64) for the run that fills the store.", UserWarning, stacklevel=4)


def _host_chunk(chunk, kernels):
    first = chunk[0]
    on_host = first.svd_backend == "numpy" or (first.svd_dtype == "float64" and not jax.config.read("jax_enable_x64"))
    xp = np if on_host else jnp  # keep host SVDs on the host: no device round trip per matrix
    d1, d2 = first.layout.d1, first.layout.d2
    matrices = [plan.layout.to_matrix(xp.asarray(kernels[plan.path])).reshape(-1, d1, d2) for plan in chunk]
    stacked = matrices[0] if len(matrices) == 1 else xp.concatenate(matrices)
    del matrices
    u, s, v = svd_factors(stacked, first.rank, first.svd_dtype, first.svd_backend, seed=first.key[0])
    del stacked
    offsets = np.cumsum([0, *(plan.layers for plan in chunk)])
    result = []
    for plan, lo, hi in zip(chunk, offsets[:-1], offsets[1:], strict=True):
        stack = plan.layout.stack_shape
        result.append((plan, (u[lo:hi].reshape(*stack, d1, plan.rank), s[lo:hi].reshape(*stack, plan.rank),
                              v[lo:hi].reshape(*stack, d2, plan.rank))))
    return result


# ---- the mesh path --------------------------------------------------------------------------

MESH_BACKENDS = ("numpy", "jax")


def _stack_spec(mesh):
    from jax.sharding import PartitionSpec

    return PartitionSpec(tuple(mesh.axis_names))


def factor_sharding(shape, mesh, fsdp: bool):
    """Where one factor lands: replicated, or (fsdp) split over "model" like `shard_params`."""
    from jax.sharding import NamedSharding, PartitionSpec

    if not fsdp:
        return NamedSharding(mesh, PartitionSpec())
    from svft_jax.distributed.sharding import MODEL, _fsdp_spec

    return NamedSharding(mesh, _fsdp_spec(tuple(shape), mesh.shape[MODEL], 2**12))


@functools.lru_cache(maxsize=64)
def _device_gather(layouts: tuple, n_pad: int, sharding):
    """jit: kernels (any sharding) -> (n_pad, d1, d2) float stack with axis 0 over the mesh."""

    def gather(*kernels):
        mats = [layout.to_matrix(k).reshape(-1, layout.d1, layout.d2) for layout, k in zip(layouts, kernels, strict=True)]
        stacked = jnp.concatenate(mats) if len(mats) > 1 else mats[0]
        pad = n_pad - stacked.shape[0]
        if pad:
            stacked = jnp.concatenate([stacked, jnp.zeros((pad, *stacked.shape[1:]), stacked.dtype)])
        return stacked

    return jax.jit(gather, out_shardings=sharding)


def _mesh_stack(chunk, kernels, mesh, n_pad: int):
    from jax.sharding import NamedSharding

    sharding = NamedSharding(mesh, _stack_spec(mesh))
    d1, d2 = chunk[0].layout.d1, chunk[0].layout.d2
    values = [kernels[plan.path] for plan in chunk]
    if any(isinstance(k, jax.Array) for k in values):
        values = [k if isinstance(k, jax.Array) else jnp.asarray(k) for k in values]
        return _device_gather(tuple(plan.layout for plan in chunk), n_pad, sharding)(*values)
    # Host kernels: each device's rows are cut from the kernels when that device asks.
    views = [plan.layout.to_matrix(np.asarray(k)).reshape(-1, d1, d2) for plan, k in zip(chunk, values, strict=True)]
    offsets = np.cumsum([0, *(v.shape[0] for v in views)])
    dtype = views[0].dtype

    def rows(index):
        lo, hi, _ = index[0].indices(n_pad)
        out = np.zeros((hi - lo, d1, d2), dtype)
        for view, start, stop in zip(views, offsets[:-1], offsets[1:], strict=True):
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                out[a - lo : b - lo] = view[a - start : b - start]
        return out

    return jax.make_array_from_callback((n_pad, d1, d2), sharding, rows)


@functools.lru_cache(maxsize=64)
def _mesh_svd(mesh, rows: int, d1: int, d2: int, rank: int, backend: str, svd_dtype: str):
    """jit(shard_map): each device factorises its block of the (rows, d1, d2) stack."""
    spec = _stack_spec(mesh)
    x64 = jax.config.read("jax_enable_x64")
    out_dtype = jnp.dtype(svd_dtype) if x64 else jnp.dtype("float32")
    local = rows // mesh.devices.size

    def one_device(block):
        if backend == "numpy":
            shapes = (jax.ShapeDtypeStruct((local, d1, rank), out_dtype), jax.ShapeDtypeStruct((local, rank), out_dtype),
                      jax.ShapeDtypeStruct((local, d2, rank), out_dtype))

            def host(b):
                return tuple(x.astype(out_dtype) for x in _numpy_svd(np.asarray(b, np.dtype(svd_dtype)), rank))

            return jax.pure_callback(host, shapes, block)
        u, s, vt = jnp.linalg.svd(block.astype(out_dtype), full_matrices=False)
        u, v = canonicalize_signs(u[..., :rank], jnp.swapaxes(vt, -1, -2)[..., :rank])
        return u, s[..., :rank], v

    return jax.jit(jax.shard_map(one_device, mesh=mesh, in_specs=spec, out_specs=(spec, spec, spec)))


@functools.lru_cache(maxsize=64)
def _mesh_split(pieces: tuple, d1: int, d2: int, rank: int, dtype: str, shardings: tuple, explicit: bool):
    """jit: the chunk's stacked (u, s, v) -> per target (u, s, v) in `dtype` and `shardings`."""

    def split(u, s, v):
        if explicit:  # sharding-in-types meshes refuse uneven slices of a sharded axis
            everywhere = jax.sharding.NamedSharding(shardings[0][0].mesh, jax.sharding.PartitionSpec())
            u, s, v = (jax.sharding.reshard(x, everywhere) for x in (u, s, v))
        out = []
        for lo, hi, stack in pieces:
            out.append((u[lo:hi].reshape(*stack, d1, rank).astype(dtype), s[lo:hi].reshape(*stack, rank).astype(dtype),
                        v[lo:hi].reshape(*stack, d2, rank).astype(dtype)))
        return tuple(out)

    return jax.jit(split, out_shardings=shardings)


def _mesh_chunk(chunk, kernels, mesh, fsdp: bool):
    first = chunk[0]
    if first.svd_backend not in MESH_BACKENDS:  # pragma: no cover - refused by apply before any SVD
        raise ValueError(f"svd_backend={first.svd_backend!r} is not available with a mesh; use one of {MESH_BACKENDS}.")
    devices = mesh.devices.size
    d1, d2, rank = first.layout.d1, first.layout.d2, first.rank
    n = sum(plan.layers for plan in chunk)
    n_pad = -(-n // devices) * devices
    stacked = _mesh_stack(chunk, kernels, mesh, n_pad)
    u, s, v = _mesh_svd(mesh, n_pad, d1, d2, rank, first.svd_backend, first.svd_dtype)(stacked)
    del stacked
    offsets = np.cumsum([0, *(plan.layers for plan in chunk)])
    pieces = tuple((int(lo), int(hi), tuple(plan.layout.stack_shape)) for plan, lo, hi in zip(chunk, offsets[:-1], offsets[1:], strict=True))
    dtypes = {plan.factor_dtype for plan in chunk}
    result = []
    for dtype in sorted(dtypes):  # a chunk shares shapes; factor dtypes may differ (overrides)
        members = [i for i, plan in enumerate(chunk) if plan.factor_dtype == dtype]
        shardings = tuple(tuple(factor_sharding(shape, mesh, fsdp) for shape in _factor_shapes(chunk[i])) for i in members)
        explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
        split = _mesh_split(tuple(pieces[i] for i in members), d1, d2, rank, dtype, shardings, explicit)
        result += [(chunk[i], triple) for i, triple in zip(members, split(u, s, v), strict=True)]
    order = {plan.path: i for i, plan in enumerate(chunk)}
    return sorted(result, key=lambda item: order[item[0].path])


def _factor_shapes(plan):
    stack, r = tuple(plan.layout.stack_shape), plan.rank
    return ((*stack, plan.layout.d1, r), (*stack, r), (*stack, plan.layout.d2, r))


def _place_factors(plan, triple, mesh, fsdp: bool):
    """Stored (host) factors of one target as global arrays in the mesh's factor sharding."""
    out = []
    for x, shape in zip(triple, _factor_shapes(plan), strict=True):
        host = np.asarray(x).astype(plan.factor_dtype)
        sharding = factor_sharding(shape, mesh, fsdp)
        out.append(jax.make_array_from_callback(host.shape, sharding, lambda index, host=host: host[index]))
    return tuple(out)
