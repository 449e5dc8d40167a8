"""SVFT (Lingam et al., "SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors", NeurIPS
2024, arXiv:2405.19597): the method's one file — its plan, node, math, init, factored matmul,
the authors' reference kernel, and `apply`.

For a target W0 ∈ R^{d1×d2} (out × in) with thin SVD W0 = U diag(s) Vᵀ and r singular triplets:

    W(M) = W0 + U M Vᵀ,    M ∈ R^{r×r} sparse on a fixed pattern Ω (`svft_jax.patterns`), M = 0 at init

Node children (arrays, seen by jit/grad/vmap/pmap):
  u:    (*stack, d1, r)   frozen left singular vectors (factor_dtype)
  s:    (*stack, r)       frozen singular values (factor_dtype)
  v:    (*stack, d2, r)   frozen right singular vectors (factor_dtype)
  m:    (*stack, |Ω|)     trainable values of M on Ω (float32)
  gate: (*stack,) or None trainable gate of init="reference": M = m · sigmoid(gate)
  base: kernel or None    frozen W0 in the kernel's own layout and dtype
With keep_base=False (full rank only) U (diag(s) + M) Vᵀ stands in for W0, as in the paper.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax._args import check_bool, check_float_dtype
from svft_jax._paths import compile_regex, matches
from svft_jax.patterns import PatternOptions, PatternSpec, get_pattern
from svft_jax.transform import _factorize
from svft_jax.transform._protocol import (
    AdapterNode,
    Plan,
    adapter_node,
    digest,
    frozen_field,
    trainable_field,
)
from svft_jax.transform._targets import (
    check_extra,
    check_finite,
    flatten_by_path,
    mark_trainable,
    replace_leaves,
    resolve_target,
    select_targets,
)

INITS = ("zeros", "reference")
OVERRIDE_KEYS = ("pattern", "d", "k", "rank", "seed", "init", "factor_dtype", "layout", "keep_base")
# Singular values closer than this (relative to the largest) make their singular vectors
# ill-defined: two SVD routines may return different vectors, so an adapter trained on one
# can mean another update on the other (float32 SVD error ~1e-7·s₀ over a gap of 1e-4·s₀
# already moves the vectors by ~1e-3).
NEAR_REPEATED_GAP = 1e-4


class PrecisionWarning(UserWarning):
    """A setting that changes the model's weights beyond float32 rounding (e.g. bfloat16
    factors standing in for W0)."""


class StaticIndices:
    """A read-only int32 numpy array that is hashable by value, for pytree aux data."""

    __slots__ = ("array", "_hash")

    def __init__(self, array):
        array = np.array(array, dtype=np.int32, copy=True)
        array.setflags(write=False)
        self.array = array
        self._hash = hash((array.shape, array.tobytes()))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticIndices) and self._hash == other._hash and np.array_equal(self.array, other.array)

    def __repr__(self) -> str:
        return f"StaticIndices(shape={self.array.shape})"


@dataclasses.dataclass(frozen=True)
class SVFTPlan(Plan):
    """Everything one SVFT target is built from, decided before any SVD.

    Attributes (besides path, layout):
      pattern: registered pattern name; d, k, seed: its options.
      rank: r, singular triplets kept. init: "zeros" or "reference".
      factor_dtype: dtype name of u, s, v. keep_base: whether W0 is stored.
      svd_backend: the resolved SVD routine ("numpy" = LAPACK, "jax" = XLA, "randomized").
      svd_dtype: "float32" or "float64".
    """

    pattern: str = "plain"
    d: int | None = None
    k: int | None = None
    seed: int = 0
    rank: int = 0
    init: str = "zeros"
    factor_dtype: str = "float32"
    keep_base: bool = True
    svd_backend: str = "numpy"
    svd_dtype: str = "float32"

    @property
    def options(self) -> PatternOptions:
        return PatternOptions(d=self.d, k=self.k, seed=self.seed)

    @property
    def spec(self) -> PatternSpec:
        return get_pattern(self.pattern)

    @property
    def key(self) -> tuple[int, ...]:
        """Identifies the target in seeded draws (random pattern, reference init)."""
        import zlib

        return (zlib.crc32(self.path.encode()),)


def _from_plan(name: str) -> property:
    """A read-only property of SVFTMeta that returns the plan's `name`."""
    return property(lambda meta: getattr(meta.plan, name), doc=f"`plan.{name}`.")


@dataclasses.dataclass(frozen=True)
class SVFTMeta:
    """Static description of one adapted kernel: its plan, Ω, and what its spectrum showed.

    Attributes:
      plan: the `SVFTPlan`.
      rows, cols: Ω as indices into M, shape (|Ω|,) or (*stack, |Ω|) for per-layer patterns.
      near_repeated: number of adjacent singular-value pairs closer than 1e-4·s₀ (over all
        layers): where > 0, the factors depend on the SVD routine (see the README rule).
    """

    plan: SVFTPlan
    rows: StaticIndices
    cols: StaticIndices
    near_repeated: int = 0

    # The plan's fields, read through the meta (node.meta.rank, node.meta.layout, ...).
    path = _from_plan("path")
    layout = _from_plan("layout")
    layers = _from_plan("layers")
    key_id = _from_plan("key_id")
    pattern = _from_plan("pattern")
    d = _from_plan("d")
    k = _from_plan("k")
    seed = _from_plan("seed")
    rank = _from_plan("rank")
    init = _from_plan("init")
    factor_dtype = _from_plan("factor_dtype")
    keep_base = _from_plan("keep_base")
    svd_backend = _from_plan("svd_backend")
    svd_dtype = _from_plan("svd_dtype")
    options = _from_plan("options")
    spec = _from_plan("spec")
    key = _from_plan("key")

    @property
    def num_entries(self) -> int:
        """|Ω| per layer."""
        return int(self.rows.array.shape[-1])

    @property
    def per_layer_indices(self) -> bool:
        return self.rows.array.ndim > 1

    @property
    def full_rank(self) -> bool:
        return self.plan.rank == min(self.plan.layout.d1, self.plan.layout.d2)

    def to_config(self) -> dict:
        return {**self.plan.to_config(), "omega_sha256": digest(self.rows.array, self.cols.array),
                "num_entries": self.num_entries}


def gather_left_product(u, coeffs, rows, cols, sorted_cols: bool = False):
    """U M for a general sparse M via gather + segment_sum: column j is Σ_{(i,j)∈Ω} M_ij u_i.

    Args: u: (d1, r); coeffs: (n,) values of M on Ω; rows, cols: (n,) int indices.
    Returns: (d1, r).
    """
    contributions = u[:, rows] * coeffs  # (d1, n)
    summed = jax.ops.segment_sum(contributions.T, cols, num_segments=u.shape[-1], indices_are_sorted=sorted_cols)
    return summed.T


def gather_coefficient_product(h, coeffs, rows, cols):
    """h Mᵀ for a general sparse M: (h Mᵀ)_i = Σ_{(i,j)∈Ω} M_ij h_j, by a gather of h at the
    columns of Ω and a segment-sum by row (T·|Ω| work, no r×r matrix).

    Args: h: (..., r); coeffs: (n,) values of M on Ω; rows, cols: (n,) static numpy indices.
    Returns: (..., r) in the promoted dtype of h and coeffs.
    """
    order = np.lexsort((cols, rows))  # by row, so the segment-sum sees sorted ids
    rows, cols = np.asarray(rows)[order], np.asarray(cols)[order]
    r = h.shape[-1]
    lead = h.shape[:-1]
    flat = h.reshape(-1, r)
    contributions = flat[:, cols] * coeffs[order]  # (T, n)
    summed = jax.ops.segment_sum(contributions.T, rows, num_segments=r, indices_are_sorted=True)
    return summed.T.reshape(*lead, r)


@adapter_node(method="svft")
class SVFTNode(AdapterNode):
    """One SVFT-adapted kernel. See the module docstring for shapes."""

    plan_cls = SVFTPlan
    axis_roles = {"u": ("out", None), "s": (None,), "v": ("in", None)}

    u: Any = frozen_field()
    s: Any = frozen_field()
    v: Any = frozen_field()
    m: Any = trainable_field()
    gate: Any = trainable_field()
    base: Any = frozen_field()
    meta: SVFTMeta = None

    # ---- M -------------------------------------------------------------------------------
    def coefficients(self):
        """The values of M on Ω: m, or m · sigmoid(gate) for init="reference". (*stack, |Ω|)."""
        if self.gate is None:
            return self.m
        return self.m * jax.nn.sigmoid(self.gate)[..., None].astype(self.m.dtype)

    def dense_coefficients(self):
        """M as a dense (*stack, r, r) float32 array. For tests and inspection, not the hot path."""
        meta = self.meta
        r, n, stack = meta.rank, meta.num_entries, meta.layout.stack_shape
        flat = jnp.asarray(self.coefficients(), jnp.float32).reshape(-1, n)
        rows = np.broadcast_to(meta.rows.array, (*stack, n)).reshape(flat.shape)
        cols = np.broadcast_to(meta.cols.array, (*stack, n)).reshape(flat.shape)
        layers = np.arange(flat.shape[0])[:, None]
        dense = jnp.zeros((flat.shape[0], r, r), jnp.float32).at[layers, rows, cols].add(flat)
        return dense.reshape(*stack, r, r)

    def left_product(self, u=None, coeffs=None):
        """U M for every layer, float32: (*stack, d1, r).

        Uses the pattern's structured product when it has one (plain: a column scale; banded:
        shifted slices), else gather/segment_sum; layers of a stacked kernel are vmapped.
        """
        meta = self.meta
        spec = meta.spec
        u = jnp.asarray(self.u if u is None else u, jnp.float32)
        coeffs = jnp.asarray(self.coefficients() if coeffs is None else coeffs, jnp.float32)
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
            out = jax.vmap(one_layer)(u_flat, c_flat, jnp.asarray(rows.reshape(layers, -1)), jnp.asarray(cols.reshape(layers, -1)))
        else:
            out = jax.vmap(lambda a, b: one_layer(a, b, rows, cols))(u_flat, c_flat)
        return out.reshape(*stack, *out.shape[1:])

    def coefficient_product(self, h, coeffs=None):
        """h (Σ + M)ᵀ for an unstacked node: the r-space step of spectral execution, float32.

        h: (..., r) -> (..., r). Σ is a scale; M uses the pattern's structured
        `coefficient_product` (plain: a scale; banded: 2d+1 fused shifted slices) or a
        gather/segment-sum over Ω, so the work is T·(r + |Ω|) and the gradient of m is read off
        h and the incoming gradient on Ω only.
        """
        meta = self.meta
        spec = meta.spec
        coeffs = jnp.asarray(self.coefficients() if coeffs is None else coeffs, jnp.float32)
        h = jnp.asarray(h, jnp.float32)
        rows, cols = meta.rows.array, meta.cols.array
        if spec.coefficient_product is not None:
            mixed = spec.coefficient_product(h, coeffs, rows, cols, meta.options)
        else:
            mixed = gather_coefficient_product(h, coeffs, rows, cols)
        return h * jnp.asarray(self.s, jnp.float32) + mixed

    @property
    def spectral_ready(self) -> bool:
        """Whether U (Σ + M) Vᵀ is the whole adapted W, so spectral execution is exact: full
        rank (W0 = U Σ Vᵀ to SVD rounding), or no stored W0 (the node's W has no residual)."""
        return self.meta.full_rank or self.base is None

    # ---- the protocol --------------------------------------------------------------------
    def delta(self, precision=None):
        """ΔW = U M Vᵀ, float32: (*stack, d1, d2).

        precision: of the d1×r×d2 product; default `_matmul.rebuild_precision()` (per
        platform). bfloat16 factors multiply in bfloat16 (two passes, float32 accumulation;
        see `_matmul.rebuild_matmul`), V is never copied to float32.
        """
        from svft_jax.transform._matmul import rebuild_matmul, rebuild_precision

        return rebuild_matmul(self.left_product(), self.v, rebuild_precision(precision))

    def weight(self, precision=None):
        """W = W0 + U M Vᵀ, or U (diag(s) + M) Vᵀ without a stored W0. float32 (*stack, d1, d2).

        precision: as for `delta`.
        """
        from svft_jax.transform._matmul import rebuild_matmul, rebuild_precision

        if self.base is not None:
            return self.base_matrix() + self.delta(precision)
        um = self.left_product() + jnp.asarray(self.u, jnp.float32) * jnp.asarray(self.s, jnp.float32)[..., None, :]
        return rebuild_matmul(um, self.v, rebuild_precision(precision))

    def matmul(self, x, *, precision=None, preferred_element_type=None):
        """x Wᵀ as x W0ᵀ + (x V)(U M)ᵀ (or (x V)(U (Σ + M))ᵀ without W0), W never formed.

        U M (d1 × r) comes from the pattern's structured left product, so no dense r × r M is
        formed and the gradient of m is computed on Ω only. x: (..., d2) -> (..., d1).
        Operands are in `compute_dtype(x, factors)` (bfloat16 factors stay bfloat16),
        accumulated in float32.
        """
        from svft_jax.transform._matmul import base_matmul, compute_dtype, mm

        um = self.left_product()
        if self.base is None:
            um = um + jnp.asarray(self.u, jnp.float32) * jnp.asarray(self.s, jnp.float32)[..., None, :]
        dtype = compute_dtype(x.dtype, self.v.dtype)
        xc = x.astype(dtype)
        h = mm(xc, self.v, precision, preferred_element_type)  # (..., r)
        y = mm(h.astype(dtype), jnp.swapaxes(um, -1, -2), precision, preferred_element_type)
        if self.base is not None:
            y = y + base_matmul(self.base, self.layout, x, precision, preferred_element_type)
        return y

    def spectral_matmul(self, x, *, precision=None, preferred_element_type=None):
        """x Wᵀ as ((x V)(Σ + M)ᵀ) Uᵀ: never touches W0, never forms W or an r×r M.

        Exact for `spectral_ready` nodes (full rank, or no stored W0); for a full-rank node
        that keeps W0 the result differs from x (W0 + U M Vᵀ)ᵀ by the SVD's rounding (float32
        factors: ~1e-6 relative; bfloat16 factors: ~4e-3, as U Σ Vᵀ in bfloat16 is not W0).

        Cost of a training step over T tokens: 2·T·r·(d1 + d2) + T·(3|Ω| + 2r) multiply-adds
        (`svft_jax.strategies.step_flops`); the gradient of m is the T·|Ω| reduction of the two
        r-dimensional activations x V and g U, read on Ω only.

        Args:
          x: (..., d2) activations.
          precision, preferred_element_type: of the two thin matmuls (the model's own dot's).
        Returns:
          (..., d1), accumulated in float32 for half-precision operands.
        Raises:
          ValueError for a stacked node or one that is not `spectral_ready`.
        """
        from svft_jax.transform._matmul import compute_dtype, mm

        if self.layout.stack_ndim:
            raise ValueError(f"{self.path}: spectral_matmul takes an unstacked node; this kernel has stack shape {self.layout.stack_shape} (index one layer first).")
        if not self.spectral_ready:
            raise ValueError(f"{self.path}: rank {self.meta.rank} < {min(self.layout.d1, self.layout.d2)} with a stored W0 has a residual W0 − U_r Σ_r V_rᵀ that U (Σ + M) Vᵀ omits; use matmul (factored) instead.")
        dtype = compute_dtype(x.dtype, self.u.dtype)
        h = mm(x.astype(dtype), self.v, precision, preferred_element_type)  # (..., r)
        z = self.coefficient_product(h)  # (..., r) float32
        return mm(z.astype(dtype), jnp.swapaxes(self.u, -1, -2), precision, preferred_element_type)

    @property
    def update_rank(self) -> int:
        return self.meta.rank

    def describe(self) -> str:
        meta = self.meta
        detail = {"banded": f"d={meta.d}", "random": f"seed={meta.seed}"}.get(meta.pattern, "")
        return f"svft-{meta.pattern}({detail})" if detail else f"svft-{meta.pattern}"

    @property
    def entries_per_layer(self) -> int:
        """|Ω| (the reference gate is counted in `num_trainable`, not here)."""
        return self.meta.num_entries

    def sketch_mismatch_reason(self) -> str:
        """By cause: a degenerate spectrum (another SVD's singular vectors are as valid), or,
        for a spectrum without near-repeated values, factors other than the training run's."""
        from svft_jax.transform._protocol import DEGENERATE_SPECTRUM_REASON

        if self.meta.near_repeated:
            return DEGENERATE_SPECTRUM_REASON
        return ("Its spectrum has no near-repeated singular values, so its SVD is unique up to rounding and the "
                "factors it was rebuilt with are not the ones it was trained with: another svd_dtype or SVD "
                "routine, or a factor store (factors=) filled from other weights. Load with the settings recorded "
                "in the file and without factors= (or with the training run's factor cache).")

    def notes(self) -> str:
        n = self.meta.near_repeated
        return f"{n} near-repeated σ" if n else ""

    def reference_kernel(self, precision=None):
        """The authors' layer (github.com/VijayLingam95/SVFT, `SVFTLayer`): W rebuilt on every
        call as U · ((Σ + M) Vᵀ), the inner product sparse — Σ + M is never a dense r×r matrix
        (the authors hold it as a torch_sparse COO matrix). Here the sparse product is the
        pattern's own r-space product applied to the rows of V ((Σ + M) Vᵀ = (V (Σ + M)ᵀ)ᵀ:
        banded/plain fused slices, random/top-k a gather + sorted segment-sum), d2·(r + |Ω|)
        work; then U · (...) is d1·d2·r. With a stored W0 (truncated rank) U · (M Vᵀ) is added
        to it. Returns the kernel in its layout.
        """
        from svft_jax.transform._matmul import compute_dtype, rebuild_precision

        meta, layout = self.meta, self.layout
        r, n, stack = meta.rank, meta.num_entries, layout.stack_shape
        layers = math.prod(stack)
        dtype = compute_dtype(jnp.float32, self.v.dtype)
        spec = meta.spec
        coeffs = jnp.asarray(self.coefficients(), jnp.float32).reshape(layers, n)
        s = jnp.asarray(self.s, jnp.float32).reshape(layers, r)
        v = jnp.asarray(self.v, jnp.float32).reshape(layers, layout.d2, r)
        u = jnp.asarray(self.u).reshape(layers, layout.d1, r)
        rows = np.broadcast_to(meta.rows.array, (*stack, n)).reshape(layers, n)
        cols = np.broadcast_to(meta.cols.array, (*stack, n)).reshape(layers, n)

        def v_times_coefficients_t(v_layer, c_layer, s_layer, rows_layer, cols_layer):  # V (Σ + M)ᵀ: (d2, r)
            if spec.coefficient_product is not None:
                out = spec.coefficient_product(v_layer, c_layer, rows_layer, cols_layer, meta.options)
            else:
                out = gather_coefficient_product(v_layer, c_layer, rows_layer, cols_layer)
            return out if self.base is not None else out + v_layer * s_layer

        if meta.per_layer_indices:
            inner = jnp.stack([v_times_coefficients_t(v[i], coeffs[i], s[i], rows[i], cols[i]) for i in range(layers)])
        else:
            inner = jax.vmap(lambda a, b, c: v_times_coefficients_t(a, b, c, rows[0], cols[0]))(v, coeffs, s)
        w = jnp.matmul(u.astype(dtype), jnp.swapaxes(inner, -1, -2).astype(dtype), precision=rebuild_precision(precision),
                       preferred_element_type=jnp.float32).reshape(*stack, layout.d1, layout.d2)
        if self.base is not None:
            w = layout.to_matrix(jnp.asarray(self.base, jnp.float32)) + w
        return layout.from_matrix(w).astype(layout.dtype)

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def build(cls, plans, kernels, *, factors=None, batch: int = 16, progress: bool = False, mesh=None, fsdp: bool = False):
        """{path: SVFTNode} for `plans`: SVDs (batched by shape; looked up in / stored to the
        `factors` store; split over `mesh`'s devices when given), Ω, initial M. The one
        constructor of `apply`, adapter files and the factor cache.

        Targets stream through one SVD batch at a time: each batch's host factors are cast to
        factor_dtype and dropped before the next batch is computed.
        """
        if mesh is not None:
            bad = sorted({p.svd_backend for p in plans} - set(_factorize.MESH_BACKENDS))
            if bad:
                raise ValueError(f"svd_backend={bad[0]!r} is not available with a mesh; use one of {_factorize.MESH_BACKENDS}.")
            if fsdp and "model" not in mesh.axis_names:
                raise ValueError(f"fsdp=True splits factors over a 'model' mesh axis; this mesh has axes {mesh.axis_names} (see svft_jax.distributed.make_mesh).")
            _check_kernels_on_mesh(plans, kernels, mesh)
        nodes = {}
        for chunk in _factorize.factor_chunks(plans, kernels, factors, batch=batch, progress=progress, mesh=mesh, fsdp=fsdp):
            for plan, (u, s, v) in chunk:
                nodes[plan.path] = cls._from_factors(plan, u, s, v, kernels[plan.path], mesh)
            del chunk
        return {plan.path: nodes[plan.path] for plan in plans}

    @classmethod
    def _from_factors(cls, plan, u, s, v, kernel, mesh):
        needs = plan.spec.needs_factors
        rows, cols = _pattern_indices(plan, _factorize._host_array(u) if needs else u, _factorize._host_array(v) if needs else v)
        m, gate = _initial_values(plan, rows.shape[-1])
        if mesh is not None:
            from svft_jax.distributed.sharding import _put, replicated

            m, gate = _put(m, replicated(mesh)), _put(gate, replicated(mesh))
        dtype = jnp.dtype(plan.factor_dtype)
        meta = SVFTMeta(plan, StaticIndices(rows), StaticIndices(cols), _near_repeated(_factorize._host_array(s)))
        if mesh is None:
            u, s, v = jnp.asarray(u, dtype), jnp.asarray(s, dtype), jnp.asarray(v, dtype)
        return cls(u=u, s=s, v=v, m=m, gate=gate, base=kernel if plan.keep_base else None, meta=meta)


def _check_kernels_on_mesh(plans, kernels, mesh) -> None:
    """Refuse a kernel committed to other devices than `mesh`'s: the SVDs gather the kernels
    onto the mesh inside one jitted call, which cannot take arrays placed elsewhere."""
    devices = set(mesh.devices.flat)
    for plan in plans:
        kernel = kernels[plan.path]
        if isinstance(kernel, jax.Array) and kernel.committed and set(kernel.sharding.device_set) != devices:
            have = sorted(d.id for d in kernel.sharding.device_set)
            want = sorted(d.id for d in devices)
            raise ValueError(
                f"parameter {plan.path!r} lives on devices {_ids(have)}, but apply(mesh=...) spans devices {_ids(want)}: "
                f"its kernels must be on that mesh's devices (or on the host). Pass the mesh the params are sharded "
                f"over, move them there (svft_jax.distributed.shard_params(params, mesh)), or pass host (numpy) arrays.")


def _ids(ids: list[int]) -> str:
    return str(ids) if len(ids) <= 8 else f"[{ids[0]}, …, {ids[-1]}] ({len(ids)} devices)"


def _near_repeated(s) -> int:
    s = np.asarray(s, np.float64)
    if s.shape[-1] < 2:
        return 0
    top = np.maximum(s[..., :1], np.finfo(np.float64).tiny)
    gaps = -np.diff(s, axis=-1) / top
    return int(np.sum(gaps < NEAR_REPEATED_GAP))


def _pattern_indices(plan: SVFTPlan, u, v) -> tuple[np.ndarray, np.ndarray]:
    """Ω for one target: (n,) shared by all layers, or (*stack, n) for per-layer patterns."""
    spec = plan.spec
    stack = plan.layout.stack_shape
    if not stack or not spec.per_layer:
        args = (np.asarray(u), np.asarray(v)) if spec.needs_factors else (None, None)
        return spec.indices(plan.rank, *args, plan.options, plan.key)
    layers = math.prod(stack)
    u_layers = np.asarray(u).reshape(layers, *np.shape(u)[len(stack):]) if spec.needs_factors else [None] * layers
    v_layers = np.asarray(v).reshape(layers, *np.shape(v)[len(stack):]) if spec.needs_factors else [None] * layers
    rows, cols = zip(*(spec.indices(plan.rank, u_layers[i], v_layers[i], plan.options, (*plan.key, i)) for i in range(layers)), strict=True)
    n = rows[0].shape[0]
    return np.stack(rows).reshape(*stack, n), np.stack(cols).reshape(*stack, n)


def _initial_values(plan: SVFTPlan, n: int):
    """(m, gate): zeros, or the authors' Kaiming-normal m (std √(2/|Ω|)) with a gate at 0."""
    shape = (*plan.layout.stack_shape, n)
    if plan.init == "zeros":
        return jnp.zeros(shape, jnp.float32), None
    # Without jax_enable_x64, jax.random.key keeps only the low 32 bits of a seed, so seeds
    # 2**32 apart would collide; fold the high bits in (a no-op for seeds below 2**32).
    seed = plan.seed
    key = jax.random.key(seed & 0xFFFFFFFF)
    if seed >> 32:
        key = jax.random.fold_in(key, (seed >> 32) & 0xFFFFFFFF)
    key = jax.random.fold_in(key, plan.key[0] & 0x7FFFFFFF)
    m = jax.random.normal(key, shape, jnp.float32) * np.sqrt(2.0 / n)
    return m, jnp.zeros(plan.layout.stack_shape, jnp.float32)


# ---- apply ---------------------------------------------------------------------------------


def _check_seed(seed) -> int:
    """`seed` as a non-negative int (numpy's seeded Generator rejects negative seeds, but only
    after the SVDs would have run)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
    if seed < 0:
        raise ValueError(f"`seed` must be >= 0, got seed={seed}; pass a non-negative int.")
    return int(seed)


def _plan_target(path: str, leaf, config: dict, svd_backend: str, svd_dtype: str) -> SVFTPlan:
    where = f"parameter {path!r}"
    target = resolve_target(path, leaf, config.get("layout"))
    layout = target.layout
    try:
        spec = get_pattern(config["pattern"])
        seed = _check_seed(config["seed"])  # may come from `overrides`
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
    keep_base = config["keep_base"]
    if not isinstance(keep_base, bool | np.bool_):
        raise TypeError(f"{where}: `keep_base` must be a bool, got {keep_base!r}.")
    if not keep_base and rank < full:
        raise ValueError(f"{where}: keep_base=False needs full rank (rank={full}); with rank={rank} the residual W0 − U_r Σ_r V_rᵀ must stay frozen, so the base weight is kept.")
    factor_dtype = check_float_dtype(config["factor_dtype"], "factor_dtype")
    if not keep_base and factor_dtype.itemsize < 4:
        warnings.warn(
            f"{where}: factor_dtype={factor_dtype.name} with keep_base=False rounds U, s, V, and U diag(s) Vᵀ "
            "then differs from W0 by ~0.3% at M = 0 (bfloat16 has 8 mantissa bits). Keep W0 (keep_base=True) "
            "for an exact base model, or use float32 factors.", PrecisionWarning, stacklevel=5)
    check_finite(target)
    backend = svd_backend if svd_backend != "randomized" or rank < full else _factorize.resolve_backend("auto")
    return SVFTPlan(path=path, layout=layout, pattern=spec.name, d=options.d, k=options.k, seed=seed,
                    rank=rank, init=init, factor_dtype=factor_dtype.name, keep_base=bool(keep_base),
                    svd_backend=backend, svd_dtype=svd_dtype)


def _compile_overrides(overrides, base_config: dict):
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        raise TypeError(f"`overrides` must be a mapping {{regex: {{option: value}}}}, got {type(overrides).__name__}.")
    compiled = []
    for regex, values in overrides.items():
        if not isinstance(values, Mapping):
            raise TypeError(f"overrides[{regex!r}] must be a dict of options, got {type(values).__name__}.")
        unknown = set(values) - set(OVERRIDE_KEYS)
        if unknown:
            raise ValueError(f"overrides[{regex!r}] has unknown options {sorted(unknown)}; allowed: {OVERRIDE_KEYS}.")
        if "pattern" in values and values["pattern"] != base_config["pattern"]:
            inherited = [f"{key}={base_config[key]!r}" for key in ("d", "k") if key not in values and base_config[key] is not None]
            if inherited:
                raise ValueError(f"overrides[{regex!r}] changes pattern to {values['pattern']!r} but would inherit the global {', '.join(inherited)}; set them in the override explicitly (None to drop).")
        compiled.append((regex, compile_regex(regex, f"overrides key {regex!r}"), dict(values)))
    return compiled


BUDGET_PATTERNS = ("banded", "random", "topk")


def _budget_total(value, total_params: int) -> int:
    """`budget` as an absolute count of trainable scalars."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"`budget` must be a fraction of all parameters (float in (0, 1]) or a count (int), got {value!r}.")
    if isinstance(value, float | np.floating):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"`budget`={value!r} as a float is a fraction of all {total_params:,} parameters and must be in (0, 1]; pass an int for an absolute count.")
        return int(math.floor(value * total_params))
    if value < 1:
        raise ValueError(f"`budget` must be a positive count, got {value!r}.")
    return int(value)


def _solve_budget(plans: list, budgeted: list[int], fixed_count: int, limit: int, pattern: str):
    """Pick the one integer knob x that makes the trainable total the largest ≤ `limit`.

    banded: x = d, the same band half-width on every budgeted target (|Ω| = banded_count(r, d)).
    random/topk: x = K, the count at the largest rank r_max; each target gets
      k = clamp(⌊K · r / r_max⌋, 1, r²), i.e. entries proportional to its rank.
    Returns (new plans, choice dict).
    """
    from svft_jax.patterns import banded_count

    r_max = max(plans[i].rank for i in budgeted)

    def per_target(i, x):
        plan = plans[i]
        if pattern == "banded":
            return dataclasses.replace(plan, d=int(x), k=None)
        return dataclasses.replace(plan, d=None, k=int(min(max(x * plan.rank // r_max, 1), plan.rank * plan.rank)))

    def total(x):
        count = fixed_count
        for i in budgeted:
            plan = plans[i]
            entries = banded_count(plan.rank, x) if pattern == "banded" else min(max(x * plan.rank // r_max, 1), plan.rank**2)
            count += plan.layers * (entries + (1 if plan.init == "reference" else 0))
        return count

    lo, hi = (0, r_max - 1) if pattern == "banded" else (1, r_max * r_max)
    if total(lo) > limit:
        knob = "d=0" if pattern == "banded" else "k=1 per target"
        raise ValueError(f"`budget` allows {limit:,} trainable parameters but the smallest {pattern} pattern ({knob}) needs {total(lo):,}; raise the budget or narrow `targets`.")
    while lo < hi:  # the total is non-decreasing in x
        mid = (lo + hi + 1) // 2
        if total(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    new = list(plans)
    for i in budgeted:
        new[i] = per_target(i, lo)
    choice = {"budget": limit, "trainable": total(lo)}
    choice.update({"d": lo} if pattern == "banded" else {"k_at_max_rank": lo, "max_rank": r_max})
    return new, choice


def make_plans(
    params,
    pattern: str = "plain",
    *,
    d: int | None = None,
    k: int | None = None,
    rank: int | None = None,
    targets: str | None = None,
    exclude: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    extra: str | None = None,
    seed: int = 0,
    factor_dtype=jnp.float32,
    init: str = "zeros",
    svd_dtype: str = "float32",
    keep_base: bool = True,
    svd_backend: str = "auto",
    budget: int | float | None = None,
):
    """SVFT's planning step of `apply` (and of `svft_jax.plan`): every target's `SVFTPlan`,
    validated, with `budget` resolved. Works on `jax.ShapeDtypeStruct` trees. No SVD runs.

    Returns:
      `svft_jax.transform._plan.Planned`.
    """
    from svft_jax.transform._plan import Planned, leaf_size, total_parameters

    seed = _check_seed(seed)
    if svd_dtype not in _factorize.SVD_DTYPES:
        raise ValueError(f"`svd_dtype` must be one of {_factorize.SVD_DTYPES}, got {svd_dtype!r}; to store the factors in bfloat16 pass factor_dtype=jnp.bfloat16.")
    backend = _factorize.resolve_backend(svd_backend)
    check_float_dtype(factor_dtype, "factor_dtype")
    if budget is not None:
        if pattern not in BUDGET_PATTERNS:
            raise ValueError(f"`budget` picks d (banded) or k (random/topk); pattern={pattern!r} has no size to pick. Use one of {BUDGET_PATTERNS}.")
        if d is not None or k is not None:
            raise ValueError(f"`budget` picks {'d' if pattern == 'banded' else 'k'} itself; drop d={d!r}/k={k!r} or the budget.")
        # provisional values so each target validates; the budget replaces them below
        d, k = (0, None) if pattern == "banded" else (None, 1)
    base_config = {"pattern": pattern, "d": d, "k": k, "rank": rank, "seed": seed, "init": init,
                   "factor_dtype": factor_dtype, "layout": None, "keep_base": keep_base}
    compiled = _compile_overrides(overrides, base_config)
    # Every override, in order: a path's layout is the first matching entry's (None if it sets none), as for every option.
    layouts = {text: values.get("layout") for text, _, values in compiled}
    chosen = select_targets(params, targets, exclude, layouts=layouts)
    unused = [text for text, regex, _ in compiled if not any(matches(regex, p) for p in chosen)]
    if unused:
        raise ValueError(f"overrides key {unused[0]!r} matches none of the {len(chosen)} targets (e.g. {chosen[:3]}); fix the regex or drop it.")
    leaves = flatten_by_path(params)

    def override_for(path):
        return next((values for _, regex, values in compiled if matches(regex, path)), {})

    plans = [_plan_target(path, leaves[path], {**base_config, **override_for(path)}, backend, svd_dtype) for path in chosen]
    extra_paths = check_extra(leaves, extra, chosen)
    choice = {}
    if budget is not None:
        limit = _budget_total(budget, total_parameters(leaves))
        # targets whose pattern or size an override sets keep it; the rest share the budget
        budgeted = [i for i, path in enumerate(chosen) if not {"pattern", "d", "k"} & set(override_for(path))]
        if not budgeted:
            raise ValueError("`budget`: every target's pattern size is set by `overrides`; nothing is left to choose.")
        fixed = sum(leaf_size(leaves[p]) for p in extra_paths)
        fixed += sum(plans[i].layers * (plans[i].spec.count(plans[i].rank, plans[i].options) + (plans[i].init == "reference"))
                     for i in range(len(plans)) if i not in set(budgeted))
        plans, choice = _solve_budget(plans, budgeted, fixed, limit, pattern)
    return Planned(plans, SVFTNode, extra_paths, choice)


def plan_arrays(plan: SVFTPlan) -> dict:
    """The arrays `SVFTNode.build` creates for `plan` ({name: ArraySpec})."""
    from svft_jax.transform._plan import ArraySpec

    layout, stack, r = plan.layout, plan.layout.stack_shape, plan.rank
    n = plan.spec.count(r, plan.options)
    arrays = {"u": ArraySpec((*stack, layout.d1, r), plan.factor_dtype, "frozen"),
              "s": ArraySpec((*stack, r), plan.factor_dtype, "frozen"),
              "v": ArraySpec((*stack, layout.d2, r), plan.factor_dtype, "frozen"),
              "m": ArraySpec((*stack, n), "float32", "trainable")}
    if plan.init == "reference":
        arrays["gate"] = ArraySpec(tuple(stack), "float32", "trainable")
    if plan.keep_base:
        arrays["base"] = ArraySpec(tuple(layout.shape), layout.dtype, "base")
    return arrays


def _describe(plan: SVFTPlan) -> str:
    detail = {"banded": f"d={plan.d}", "random": f"seed={plan.seed}", "topk": f"k={plan.k}"}.get(plan.pattern, "")
    if plan.pattern == "random":
        detail = f"k={plan.spec.count(plan.rank, plan.options)}"
    return f"svft-{plan.pattern}({detail})" if detail else f"svft-{plan.pattern}"


def _register_planner():
    from svft_jax.transform._plan import Planner, register_planner

    register_planner(Planner(
        method="svft", make_plans=make_plans, arrays=plan_arrays, update_rank=lambda plan: plan.rank,
        has_base=lambda plan: plan.keep_base, describe=_describe,
        entries=lambda plan: plan.spec.count(plan.rank, plan.options)))


_register_planner()


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
    extra: str | None = None,
    seed: int = 0,
    factor_dtype=jnp.float32,
    init: str = "zeros",
    svd_dtype: str = "float32",
    keep_base: bool = True,
    svd_backend: str = "auto",
    factors: Mapping | MutableMapping | None = None,
    svd_batch: int = 16,
    progress: bool = False,
    budget: int | float | None = None,
    mesh=None,
    fsdp: bool = False,
):
    """Replace target kernels by SVFT nodes: W = W0 + U M Vᵀ with M sparse on a pattern Ω.

    SVFT (Lingam et al., NeurIPS 2024, arXiv:2405.19597), §3.

    Args:
      params: any parameter pytree (Flax linen `params`, NNX state or pure dict, HF `model.params`).
      pattern: "plain" (diagonal), "banded" (|i − j| ≤ d), "random" (k seeded positions) or
        "topk" (k largest |u_iᵀ v_j|), or any name added with `register_pattern`.
      d: band half-width for "banded"; for random/top-k without `k`, the budget of the d-band.
      k: number of trainable entries per target for random/top-k.
      rank: singular triplets kept (None: r = min(d1, d2)). With rank < r, W0 stays frozen
        beside U_r, V_r, so M = 0 still gives W0 exactly.
      targets: regex matched in full against '/'-joined paths (e.g. '.*(query|value)/kernel');
        None picks every 2-D (or N-D) 'kernel' outside embeddings, norms, biases and heads.
      exclude: regex of paths never adapted (must match some parameter).
      overrides: {regex: {option: value}}; the first regex that matches a target's path
        overrides `pattern`, `d`, `k`, `rank`, `seed`, `init`, `factor_dtype`, `keep_base` or
        `layout` for it. Every regex must match a target.
      extra: regex of leaves trained in full beside the adapters (a new head, e.g.
        'classifier/.*'); they are marked `Trainable` in the result, so `split`, `optimizer`,
        `summary` and `save_adapter` need not be told again.
      seed: seeds the random pattern and init="reference" (with a checksum of each path).
      factor_dtype: dtype of the stored U, s, V (M is always float32).
      init: "zeros" (M = 0) or "reference" (the authors' Kaiming-normal m · sigmoid(gate)).
      svd_dtype: "float32" or "float64".
      keep_base: store W0 in the node (exact W0 at M = 0, needed by factored execution).
      svd_backend: "auto" (LAPACK on a CPU host, XLA on an accelerator), "jax", "numpy" or
        "randomized" (truncated rank only). The resolved back-end is recorded in each node, so
        an adapter file reloads with the routine that made its factors.
      factors: a factor store — a Mapping from `svft_jax.checkpoint.factor_key`-style keys to
        (u, s, v) — read before computing an SVD and, if mutable, written after; or the path
        (str or os.PathLike) of a factor cache file or folder, read with
        `svft_jax.checkpoint.load_factor_cache`. Every entry read is checked against its kernel
        (shapes, rank, dtype, and that it is this kernel's SVD to the SVD's tolerance) and a
        wrong one is refused, naming the target and the store. With a `mesh`, each process
        writes the factors it computed.
      svd_batch: how many same-shaped matrices one batched SVD call takes (with a `mesh`, per
        device).
      progress: show a progress bar over SVD batches.
      budget: pick the pattern size instead of `d`/`k`: a fraction of all parameters (float in
        (0, 1]) or an absolute count (int) of trainable scalars (adapters, reference gates and
        `extra` leaves). "banded": one d for every target, the largest whose total fits;
        "random"/"topk": k proportional to each target's rank, k = ⌊K·r/r_max⌋ with the largest
        K that fits. Targets whose pattern/d/k an override sets keep it. `svft_jax.plan`
        reports the choice.
      mesh: a `jax.sharding.Mesh`: the SVDs are split over its devices (and processes) — each
        device factorises its share of every batch of same-shaped matrices, from kernels that
        may be sharded or non-addressable — and the factors come back as global arrays
        replicated over the mesh (or FSDP-sharded with `fsdp=True`, as
        `svft_jax.distributed.shard_params`).
      fsdp: with `mesh`, split each factor over the mesh's "model" axis (its largest divisible
        axis) instead of replicating it.
    Returns:
      `params` with each target leaf replaced by an `SVFTNode` (and `extra` leaves marked).
    Raises:
      ValueError/TypeError naming the parameter path, before any SVD runs.
    """
    if isinstance(svd_batch, bool) or not isinstance(svd_batch, int) or svd_batch < 1:
        raise ValueError(f"`svd_batch` must be a positive int, got {svd_batch!r}.")
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    fsdp = check_bool(fsdp, "fsdp")
    progress = check_bool(progress, "progress")
    if fsdp and mesh is None:
        raise ValueError("`fsdp=True` shards the factors over a mesh; pass mesh= too.")
    if factors is not None and not isinstance(factors, Mapping):
        from svft_jax.checkpoint.cache import (
            as_factor_store,  # a path: read as load_adapter reads it
        )

        factors = as_factor_store(factors, "apply")
    planned = make_plans(params, pattern, d=d, k=k, rank=rank, targets=targets, exclude=exclude, overrides=overrides,
                         extra=extra, seed=seed, factor_dtype=factor_dtype, init=init, svd_dtype=svd_dtype,
                         keep_base=keep_base, svd_backend=svd_backend, budget=budget)
    leaves = flatten_by_path(params)
    for plan in planned.plans:
        if isinstance(leaves[plan.path], jax.ShapeDtypeStruct):
            path = plan.path
            raise TypeError(f"parameter {path!r} is a jax.ShapeDtypeStruct (a shapes-only tree); `apply` needs the weights. Use `svft_jax.plan` to size a model from shapes.")
    nodes = SVFTNode.build(planned.plans, leaves, factors=factors, batch=svd_batch, progress=progress, mesh=mesh, fsdp=fsdp)
    return mark_trainable(replace_leaves(params, nodes), extra)
