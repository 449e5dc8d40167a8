"""`svft_jax.apply`: turn a parameter pytree into SVFT nodes on the chosen targets.

Everything the user could get wrong is checked first (options, targets, shapes, dtypes,
NaN/Inf), so a bad call fails in milliseconds with the parameter path in the message,
before any SVD runs.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax._paths import compile_regex, matches, path_to_str
from svft_jax.patterns import PatternOptions, PatternSpec, get_pattern
from svft_jax.transform.factorize import (
    SVD_BACKENDS,
    SVD_DTYPES,
    active_svd_cache,
    factor_cache_key,
    resolve_backend,
    svd_factors,
)
from svft_jax.transform.layout import KernelLayout, resolve_layout
from svft_jax.transform.node import StaticIndices, SVFTMeta, SVFTNode, is_node

INITS = ("zeros", "reference")

# A path component that marks a leaf the default targets never touch: embeddings, norms,
# biases and output heads (the paper adapts attention and MLP projections only).
DEFAULT_EXCLUDED_COMPONENT = re.compile(
    r"(?i)(.*embed.*|.*norm.*|ln|ln_.*|.*_ln|bias|head|.*_head|heads?_.*|classifier|pooler"
    r"|score|wte|wpe|patch_embeddings)"
)

OVERRIDE_KEYS = ("pattern", "d", "k", "rank", "seed", "init", "factor_dtype", "layout", "keep_base")


@dataclasses.dataclass(frozen=True)
class _TargetPlan:
    """Everything needed to adapt one kernel, decided before any SVD runs."""

    path: str
    layout: KernelLayout
    spec: PatternSpec
    options: PatternOptions
    rank: int
    init: str
    factor_dtype: Any
    keep_base: bool

    @property
    def key(self) -> tuple[int, ...]:
        """Identifies the target in seeded draws (random pattern, reference init)."""
        return (zlib.crc32(self.path.encode()),)


def _is_default_candidate(path: str, leaf) -> bool:
    components = path.split("/")
    kernel_name = components[-1] == "kernel" or components[-2:] == ["kernel", "value"]
    return (
        kernel_name
        and hasattr(leaf, "ndim")
        and leaf.ndim >= 2
        and jnp.issubdtype(leaf.dtype, jnp.floating)
        and not any(DEFAULT_EXCLUDED_COMPONENT.fullmatch(c) for c in components[:-1])
    )


def _check_dtype_arg(value, name: str):
    try:
        dtype = jnp.dtype(value)
    except TypeError as err:
        raise TypeError(f"`{name}` must be a dtype, got {value!r}.") from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`{name}` must be a floating dtype, got {dtype}.")
    return dtype


def _check_seed(seed) -> int:
    """`seed` as a non-negative int. Checked up front because numpy's seeded Generator (the
    random pattern) rejects negative seeds only after the SVDs have run."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
    if seed < 0:
        raise ValueError(f"`seed` must be >= 0, got seed={seed}; pass a non-negative int.")
    return int(seed)


def _resolve_config(path: str, base: dict, overrides) -> dict:
    config = dict(base)
    for regex, values in overrides:
        if matches(regex, path):
            config.update(values)
            break
    return config


def _plan_target(path: str, leaf, config: dict) -> _TargetPlan:
    where = f"parameter {path!r}"
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise TypeError(f"{where} was chosen as a target but is a {type(leaf).__name__}, not an array.")
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(f"{where} was chosen as a target but has dtype {leaf.dtype}; SVFT adapts floating weights only. Narrow `targets` or add it to `exclude`.")
    if leaf.ndim < 2:
        raise ValueError(f"{where} was chosen as a target but has shape {tuple(leaf.shape)}; SVFT needs a 2-D (or N-D) kernel, not a {leaf.ndim}-D leaf. Narrow `targets` (biases and norms cannot be adapted).")
    try:
        layout = resolve_layout(leaf.shape, jnp.dtype(leaf.dtype).name, config.get("layout"))
    except (ValueError, TypeError) as err:
        raise type(err)(f"{where}: {err}.") from err
    if layout is None:
        raise ValueError(f"{where} has shape {tuple(leaf.shape)} whose input/output axes cannot be inferred; declare them with overrides={{{path!r}: {{'layout': {{'stack_ndim': ..., 'in_axes': (...), 'out_axes': (...)}}}}}}.")

    try:
        spec = get_pattern(config["pattern"])
        # `seed` may come from `overrides`, which `apply` has not checked yet.
        seed = _check_seed(config["seed"])
        options = PatternOptions(d=config["d"], k=config["k"], seed=seed)
        spec.check(options)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{where}: {err}") from err

    full = min(layout.d1, layout.d2)
    rank = config["rank"]
    if rank is None:
        rank = full
    elif isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise TypeError(f"{where}: `rank` must be an int or None, got {type(rank).__name__}.")
    elif not 1 <= rank <= full:
        raise ValueError(f"{where}: rank={rank} is out of range; W is {layout.d1}×{layout.d2}, so rank must be in [1, {full}] (or None for full rank).")
    rank = int(rank)

    count = spec.count(rank, options)
    if count > rank * rank:
        raise ValueError(f"{where}: k={count} entries do not fit in the {rank}×{rank} grid of M (rank {rank}); use k ≤ {rank * rank} or a larger rank.")

    init = config["init"]
    if init not in INITS:
        raise ValueError(f"`init` must be one of {INITS}, got {init!r} (for {where}).")
    keep_base = bool(config["keep_base"])
    if not keep_base and rank < full:
        raise ValueError(f"{where}: keep_base=False needs full rank (rank={full}); with rank={rank} the residual W0 − U_r Σ_r V_rᵀ must stay frozen, so the base weight is kept.")
    factor_dtype = _check_dtype_arg(config["factor_dtype"], "factor_dtype")
    if not bool(jnp.all(jnp.isfinite(leaf))):
        raise ValueError(f"{where} contains NaN or Inf; fix the checkpoint before adapting it (the SVD of a non-finite matrix is meaningless).")
    return _TargetPlan(path, layout, spec, options, rank, init, factor_dtype, keep_base)


def select_targets(params, targets: str | None = None, exclude: str | None = None) -> list[str]:
    """Paths that `apply` would adapt (same rules, no SVD). Useful to preview `targets`."""
    targets_re = compile_regex(targets, "targets")
    exclude_re = compile_regex(exclude, "exclude")
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0]
    chosen = []
    for path, leaf in leaves:
        name = path_to_str(path)
        if is_node(leaf):
            raise ValueError(f"parameter {name!r} is already an SVFT node; apply SVFT to the original params (or `merge` first).")
        if matches(exclude_re, name):
            continue
        if targets_re is None:
            if _is_default_candidate(name, leaf) and resolve_layout(leaf.shape, leaf.dtype) is not None:
                chosen.append(name)
        elif matches(targets_re, name):
            chosen.append(name)
    if not chosen:
        sample = [path_to_str(p) for p, _ in leaves[:8]]
        what = f"targets={targets!r}" if targets is not None else "the default targets (2-D+ 'kernel' leaves outside embeddings, norms and heads)"
        raise ValueError(f"{what} matched no parameter (exclude={exclude!r}). Paths are '/'-joined and matched in full, e.g. {sample}; try a regex like '.*query/kernel'.")
    return chosen


def _factorize(plans: list[_TargetPlan], leaves: dict, svd_dtype: str, backend: str, batch: int, progress: bool):
    """SVDs of all targets, same-shaped matrices batched together. Returns {path: (u, s, v)}.

    Targets found in the active `svd_cache` (if any) are not recomputed; computed ones are
    stored in it. Each batch is one call of `svd_factors` (LAPACK's gesdd in a loop on the
    host, or one batched XLA SVD on an accelerator).
    """
    backend = resolve_backend(backend)
    cache = active_svd_cache()
    factors, keys = {}, {}
    if cache is not None:
        for plan in plans:
            matrix = plan.layout.to_matrix(np.asarray(leaves[plan.path]))
            keys[plan.path] = factor_cache_key(matrix, plan.rank, svd_dtype, backend)
            if keys[plan.path] in cache:
                factors[plan.path] = tuple(cache[keys[plan.path]])
    groups: dict[tuple, list[_TargetPlan]] = {}
    for plan in plans:
        if plan.path in factors:
            continue
        key = (plan.layout.d1, plan.layout.d2, plan.rank, jnp.dtype(leaves[plan.path].dtype).name)
        groups.setdefault(key, []).append(plan)
    chunks = [group[i : i + batch] for group in groups.values() for i in range(0, len(group), batch)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="SVFT: SVD", unit="batch")
    on_host = backend == "numpy" or (svd_dtype == "float64" and not jax.config.read("jax_enable_x64"))
    xp = np if on_host else jnp  # keep host SVDs on the host: no device round trip per matrix
    for chunk in chunks:
        matrices = [plan.layout.to_matrix(xp.asarray(leaves[plan.path])) for plan in chunk]
        sizes = [int(np.prod(plan.layout.stack_shape, dtype=int)) for plan in chunk]
        d1, d2 = chunk[0].layout.d1, chunk[0].layout.d2
        stacked = xp.concatenate([m.reshape(-1, d1, d2) for m in matrices])
        u, s, v = svd_factors(stacked, chunk[0].rank, svd_dtype, backend, seed=chunk[0].key[0])
        offsets = np.cumsum([0, *sizes])
        for plan, lo, hi in zip(chunk, offsets[:-1], offsets[1:], strict=True):
            stack = plan.layout.stack_shape
            factors[plan.path] = (
                u[lo:hi].reshape(*stack, d1, plan.rank),
                s[lo:hi].reshape(*stack, plan.rank),
                v[lo:hi].reshape(*stack, d2, plan.rank),
            )
            if cache is not None:
                cache[keys[plan.path]] = tuple(np.asarray(x) for x in factors[plan.path])
    return factors


def _pattern_indices(plan: _TargetPlan, u, v) -> tuple[np.ndarray, np.ndarray]:
    """Ω for one target: (n,) shared by all layers, or (*stack, n) for per-layer patterns."""
    stack = plan.layout.stack_shape
    if not stack or not plan.spec.per_layer:
        args = (np.asarray(u), np.asarray(v)) if plan.spec.needs_factors else (None, None)
        return plan.spec.indices(plan.rank, *args, plan.options, plan.key)
    layers = int(np.prod(stack))
    u_layers = np.asarray(u).reshape(layers, *np.shape(u)[len(stack):]) if plan.spec.needs_factors else [None] * layers
    v_layers = np.asarray(v).reshape(layers, *np.shape(v)[len(stack):]) if plan.spec.needs_factors else [None] * layers
    rows, cols = zip(*(plan.spec.indices(plan.rank, u_layers[i], v_layers[i], plan.options, (*plan.key, i)) for i in range(layers)), strict=True)
    n = rows[0].shape[0]
    return np.stack(rows).reshape(*stack, n), np.stack(cols).reshape(*stack, n)


def _initial_values(plan: _TargetPlan, n: int):
    """(m, gate): zeros, or the authors' Kaiming-normal m (std √(2/|Ω|)) with a gate at 0."""
    shape = (*plan.layout.stack_shape, n)
    if plan.init == "zeros":
        return jnp.zeros(shape, jnp.float32), None
    # Without jax_enable_x64, jax.random.key keeps only the low 32 bits of a seed, so seeds
    # 2**32 apart would collide; fold the high bits in (a no-op for seeds below 2**32).
    seed = plan.options.seed
    key = jax.random.key(seed & 0xFFFFFFFF)
    if seed >> 32:
        key = jax.random.fold_in(key, (seed >> 32) & 0xFFFFFFFF)
    key = jax.random.fold_in(key, plan.key[0] & 0x7FFFFFFF)
    m = jax.random.normal(key, shape, jnp.float32) * np.sqrt(2.0 / n)
    return m, jnp.zeros(plan.layout.stack_shape, jnp.float32)


def apply(
    params,
    pattern: str = "plain",
    *,
    d: int | None = None,
    k: int | None = None,
    rank: int | None = None,
    targets: str | None = None,
    exclude: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    factor_dtype=jnp.float32,
    init: str = "zeros",
    svd_dtype: str = "float32",
    keep_base: bool = True,
    svd_backend: str = "auto",
    svd_batch: int = 16,
    progress: bool = False,
):
    """Replace target kernels by SVFT nodes: W = W0 + U M Vᵀ with M sparse on a pattern Ω.

    SVFT (Lingam et al., "SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors",
    NeurIPS 2024, arXiv:2405.19597), §3.

    Args:
      params: any parameter pytree (Flax linen `params`, NNX pure dict, HF `model.params`).
      pattern: "plain" (diagonal), "banded" (|i − j| ≤ d), "random" (k seeded positions) or
        "topk" (k largest |u_iᵀ v_j|), or any name added with `register_pattern`.
      d: band half-width for "banded"; for random/top-k without `k`, the budget of the
        d-band (the paper's rule for SVFT^R and SVFT^T).
      k: number of trainable entries per target for random/top-k.
      rank: singular triplets kept (None: r = min(d1, d2)). With rank < r, W0 stays frozen
        beside U_r, V_r, so M = 0 still gives W0 exactly.
      targets: regex matched in full against '/'-joined paths (e.g. '.*(query|value)/kernel');
        None picks every 2-D (or N-D) 'kernel' outside embeddings, norms, biases and heads.
      exclude: regex of paths never adapted.
      overrides: {regex: {option: value}}; the first regex that matches a target's path
        overrides `pattern`, `d`, `k`, `rank`, `seed`, `init`, `factor_dtype`, `keep_base`
        or `layout` ("in_out", "out_in", "stacked_in_out" or a dict with `stack_ndim`,
        `in_axes`, `out_axes`) for that target.
      seed: seeds the random pattern and init="reference"; combined with a checksum of each
        target's path so targets differ but runs are reproducible on every platform.
      factor_dtype: dtype of the stored U, s, V (bfloat16 halves their memory; merge still
        computes in float32). M is always float32.
      init: "zeros" (M = 0, the adapted model starts as the base model) or "reference" (the
        authors' code: Kaiming-normal m scaled by sigmoid(gate), gate trainable from 0, so
        training starts from W0 + ½ U M Vᵀ, not W0).
      svd_dtype: "float32" or "float64" (computed with LAPACK unless jax_enable_x64 is on).
      keep_base: store W0 in the node (exact W0 at M = 0, and needed by factored execution).
        With False and full rank, U (diag(s) + M) Vᵀ stands in for W0, as in the paper.
      svd_backend: "auto" (LAPACK on the host when JAX runs on CPU — faster than XLA:CPU's
        SVD — else XLA on the accelerator), "jax", "numpy", or "randomized" (approximate,
        for rank < min(d1, d2); see `svft_jax.transform.factorize`).
      svd_batch: how many same-shaped matrices one batched SVD call takes.
      progress: show a progress bar over SVD batches.

    Returns:
      A pytree with the structure of `params` where each target leaf is an `SVFTNode` and
      every other leaf is the original object.

    Raises:
      ValueError/TypeError naming the parameter path, before any SVD, for bad options or
      targets.
    """
    if svd_dtype not in SVD_DTYPES:
        hint = " Compute the SVD in float32 and store bfloat16 factors with factor_dtype=jnp.bfloat16." if "16" in str(svd_dtype) else ""
        raise ValueError(f"svd_dtype must be one of {SVD_DTYPES}, got {svd_dtype!r}.{hint}")
    if svd_backend not in SVD_BACKENDS:
        raise ValueError(f"svd_backend must be one of {SVD_BACKENDS}, got {svd_backend!r}.")
    seed = _check_seed(seed)
    if not isinstance(svd_batch, int) or svd_batch < 1:
        raise ValueError(f"`svd_batch` must be a positive int, got {svd_batch!r}.")
    get_pattern(pattern)  # unknown name -> ValueError listing the known ones
    base_config = dict(pattern=pattern, d=d, k=k, rank=rank, seed=int(seed), init=init,
                       factor_dtype=factor_dtype, layout=None, keep_base=keep_base)
    compiled_overrides = []
    for regex, values in (overrides or {}).items():
        if not isinstance(values, Mapping):
            raise TypeError(f"overrides[{regex!r}] must be a dict of options, got {type(values).__name__}.")
        unknown = set(values) - set(OVERRIDE_KEYS)
        if unknown:
            raise ValueError(f"overrides[{regex!r}] has unknown options {sorted(unknown)}; allowed: {OVERRIDE_KEYS}.")
        compiled_overrides.append((compile_regex(regex, f"overrides key {regex!r}"), dict(values)))

    chosen = select_targets(params, targets, exclude)
    leaves = {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    plans = [_plan_target(path, leaves[path], _resolve_config(path, base_config, compiled_overrides)) for path in chosen]

    factors = _factorize(plans, leaves, svd_dtype, svd_backend, svd_batch, progress)
    nodes = {}
    for plan in plans:
        u, s, v = factors[plan.path]
        rows, cols = _pattern_indices(plan, u, v)
        m, gate = _initial_values(plan, rows.shape[-1])
        meta = SVFTMeta(
            path=plan.path, pattern=plan.spec.name, options=plan.options, rank=plan.rank,
            layout=plan.layout, rows=StaticIndices(rows), cols=StaticIndices(cols),
            init=plan.init, factor_dtype=plan.factor_dtype.name,
        )
        nodes[plan.path] = SVFTNode(
            u=jnp.asarray(u, plan.factor_dtype), s=jnp.asarray(s, plan.factor_dtype),
            v=jnp.asarray(v, plan.factor_dtype), m=m, gate=gate,
            base=leaves[plan.path] if plan.keep_base else None, meta=meta,
        )
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: nodes.get(path_to_str(path), leaf), params
    )
