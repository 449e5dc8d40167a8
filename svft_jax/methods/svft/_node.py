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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax.core._protocol import (
    AdapterNode,
    ArraySpec,
    Plan,
    adapter_node,
    digest,
    frozen_field,
    one_layer_layout,
    trainable_field,
    with_layout,
)
from svft_jax.methods.svft import _factorize
from svft_jax.patterns import PatternOptions, PatternSpec, get_pattern
from svft_jax.strategies.registry import register_strategy

INITS = ("zeros", "reference")
OVERRIDE_KEYS = ("pattern", "d", "k", "rank", "seed", "init", "factor_dtype", "layout", "keep_base")
# Singular values closer than this (relative to the largest) make their singular vectors
# ill-defined: two SVD routines may return different vectors, so an adapter trained on one
# can mean another update on the other (float32 SVD error ~1e-7·s₀ over a gap of 1e-4·s₀
# already moves the vectors by ~1e-3).
NEAR_REPEATED_GAP = 1e-4


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
    pattern_options: tuple = ()  # a typed pattern's options of its own: sorted (name, value) pairs

    @property
    def options(self) -> PatternOptions:
        return PatternOptions(d=self.d, k=self.k, seed=self.seed, own=self.pattern_options)

    def to_config(self) -> dict:
        """As `Plan.to_config`; `pattern_options` only when the pattern has some (so files of
        the built-in patterns record exactly what format 2 always recorded)."""
        config = super().to_config()
        if self.pattern_options:
            config["pattern_options"] = [list(pair) for pair in self.pattern_options]
        else:
            del config["pattern_options"]
        return config

    @classmethod
    def from_config(cls, config):
        plan = super().from_config({k: v for k, v in config.items() if k != "pattern_options"})
        own = tuple(tuple(pair) for pair in config.get("pattern_options", ()))
        return dataclasses.replace(plan, pattern_options=own)

    @property
    def spec(self) -> PatternSpec:
        return get_pattern(self.pattern)

    @property
    def key(self) -> tuple[int, ...]:
        """Identifies the target in seeded draws (random pattern, reference init)."""
        import zlib

        return (zlib.crc32(self.path.encode()),)

    @property
    def entries(self) -> int:
        """|Ω| per layer."""
        return self.spec.count(self.rank, self.options)

    @property
    def has_base(self) -> bool:
        return self.keep_base

    def arrays(self) -> dict:
        """The arrays `SVFTNode.build` creates: u (*stack, d1, r), s (*stack, r), v (*stack, d2, r)
        in factor_dtype; m (*stack, |Ω|) float32; gate (*stack,) for init="reference"; W0."""
        layout, stack, r = self.layout, self.layout.stack_shape, self.rank
        arrays = {"u": ArraySpec((*stack, layout.d1, r), self.factor_dtype, "frozen"),
                  "s": ArraySpec((*stack, r), self.factor_dtype, "frozen"),
                  "v": ArraySpec((*stack, layout.d2, r), self.factor_dtype, "frozen"),
                  "m": ArraySpec((*stack, self.entries), "float32", "trainable")}
        if self.init == "reference":
            arrays["gate"] = ArraySpec(tuple(stack), "float32", "trainable")
        if self.keep_base:
            arrays["base"] = ArraySpec(tuple(layout.shape), layout.dtype, "base")
        return arrays

    def describe(self) -> str:
        """e.g. "svft-banded(d=2)", "svft-random(k=24)", "svft-topk(k=24)", "svft-plain"."""
        detail = {"banded": f"d={self.d}", "random": f"k={self.entries}", "topk": f"k={self.k}"}.get(self.pattern, "")
        return f"svft-{self.pattern}({detail})" if detail else f"svft-{self.pattern}"


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

    def __getattr__(self, name):
        """The plan's fields and properties, read through the meta (node.meta.rank, .layout, ...)."""
        if name.startswith("__") or name == "plan":  # copy/pickle probes, and before `plan` is set
            raise AttributeError(name)
        return getattr(self.plan, name)

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
        from svft_jax.core._matmul import rebuild_matmul, rebuild_precision

        return rebuild_matmul(self.left_product(), self.v, rebuild_precision(precision))

    def weight(self, precision=None):
        """W = W0 + U M Vᵀ, or U (diag(s) + M) Vᵀ without a stored W0. float32 (*stack, d1, d2).

        precision: as for `delta`.
        """
        from svft_jax.core._matmul import rebuild_matmul, rebuild_precision

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
        from svft_jax.core._matmul import base_matmul, compute_dtype, mm

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
        from svft_jax.core._matmul import compute_dtype, mm

        if self.layout.stack_ndim:
            raise ValueError(f"{self.path}: spectral_matmul takes an unstacked node; this kernel has stack shape {self.layout.stack_shape} (index one layer first).")
        if not self.spectral_ready:
            raise ValueError(f"{self.path}: rank {self.meta.rank} < {min(self.layout.d1, self.layout.d2)} with a stored W0 has a residual W0 − U_r Σ_r V_rᵀ that U (Σ + M) Vᵀ omits; use matmul (factored) instead.")
        dtype = compute_dtype(x.dtype, self.u.dtype)
        h = mm(x.astype(dtype), self.v, precision, preferred_element_type)  # (..., r)
        z = self.coefficient_product(h)  # (..., r) float32
        return mm(z.astype(dtype), jnp.swapaxes(self.u, -1, -2), precision, preferred_element_type)

    @property
    def entries_per_layer(self) -> int:
        """|Ω| (the reference gate is counted in `num_trainable`, not here)."""
        return self.meta.num_entries

    def sketch_mismatch_reason(self) -> str:
        """By cause: a degenerate spectrum (another SVD's singular vectors are as valid), or,
        for a spectrum without near-repeated values, factors other than the training run's."""
        from svft_jax.core._protocol import DEGENERATE_SPECTRUM_REASON

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
        from svft_jax.core._matmul import compute_dtype, rebuild_precision

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

    # ---- protocol hooks (read by generic code: strategies, files, factor stores) ---------
    @property
    def spectral_exact(self) -> bool:
        """spectral_ready, and W0 either not stored or equal to U Σ Vᵀ to float32 rounding
        (float32+ factors)."""
        return self.spectral_ready and (self.base is None or jnp.dtype(self.u.dtype).itemsize >= 4)

    @property
    def sparse_entries(self) -> int:
        return self.meta.num_entries

    def without_unused_base(self):
        """Without W0 at full rank with float32+ factors (see `strategies.drop_unused_base`)."""
        if self.base is None or not self.meta.full_rank or jnp.dtype(self.u.dtype).itemsize < 4:
            return self
        meta = dataclasses.replace(self.meta, plan=dataclasses.replace(self.meta.plan, keep_base=False))
        return dataclasses.replace(self, base=None, meta=meta)

    @property
    def has_factors(self) -> bool:
        return True

    @property
    def factors_lossless(self) -> bool:
        return self.meta.factor_dtype == self.meta.svd_dtype

    def factor_cache_entry(self, kernel) -> tuple[str, tuple]:
        """(factor_key, (u, s, v) as numpy) over the original kernel."""
        meta = self.meta
        key = _factorize.factor_key(self.layout.to_matrix(np.asarray(kernel)), meta.rank, meta.svd_dtype, meta.svd_backend)
        return key, tuple(np.asarray(getattr(self, f)) for f in ("u", "s", "v"))

    def file_tensors(self) -> dict:
        """Ω as saved: rows, cols. Indices are < r, so uint16 nearly always fits (Ω would
        otherwise be 2/3 of the file)."""
        index_dtype = np.uint16 if self.meta.rank <= np.iinfo(np.uint16).max else np.int32
        return {"rows": self.meta.rows.array.astype(index_dtype), "cols": self.meta.cols.array.astype(index_dtype)}

    def layer_slicer(self):
        """Split a node stacked on its leading axis into per-layer pieces.

        u/s/v/m/gate/base are sliced on axis 0 and the layout loses that axis. A pattern with one
        Ω for all layers keeps its (static) indices. With per-layer Ω (e.g. top-k on a stacked
        kernel) the static indices of a per-iteration node cannot differ by layer, so every layer
        is written on the union of the layers' Ω, with m scattered into it (zeros elsewhere; the
        gradient reaches m through the gather, so it is exact). That costs |Ω ∪| instead of |Ω|
        per layer in the left product U M; patterns with a structured product (plain, banded)
        are never per-layer.
        """
        meta = self.meta
        layout = meta.layout
        if layout.stack_ndim < 1:
            return None
        fields = {name: getattr(self, name) for name in self.data_fields() if getattr(self, name) is not None}
        new_meta = with_layout(meta, one_layer_layout(layout))
        if meta.per_layer_indices:
            if layout.stack_ndim != 1 or meta.spec.left_product is not None:
                return None
            r = meta.rank
            pairs = meta.rows.array.astype(np.int64) * r + meta.cols.array  # (L, n)
            union = np.unique(pairs)  # sorted by (row, col)
            # Where each union entry sits in each layer's m (-1: not in that layer's Ω).
            position = np.full((pairs.shape[0], union.size), -1, np.int64)
            for layer, layer_pairs in enumerate(pairs):
                where = np.searchsorted(union, layer_pairs)
                position[layer, where] = np.arange(layer_pairs.size)
            valid = position >= 0
            m = jnp.take_along_axis(self.m, jnp.asarray(np.maximum(position, 0), jnp.int32), axis=-1)
            fields["m"] = jnp.where(jnp.asarray(valid), m, jnp.zeros((), m.dtype))
            new_meta = dataclasses.replace(new_meta, rows=StaticIndices(union // r), cols=StaticIndices(union % r))

        def rebuild(sliced):
            return type(self)(**{name: sliced.get(name) for name in self.data_fields()}, meta=new_meta)

        return fields, rebuild

    def take_layer(self, index):
        """Layer `index`; a Python int on a per-layer Ω takes that layer's own Ω (a traced index
        gets the union, see `layer_slicer`)."""
        meta = self.meta
        if isinstance(index, int | np.integer) and meta.per_layer_indices and meta.layout.stack_ndim >= 1:
            layer_meta = dataclasses.replace(
                with_layout(meta, one_layer_layout(meta.layout)),
                rows=StaticIndices(meta.rows.array[index]), cols=StaticIndices(meta.cols.array[index]))
            values = {name: None if getattr(self, name) is None else getattr(self, name)[index] for name in self.data_fields()}
            return type(self)(**values, meta=layer_meta)
        return super().take_layer(index)

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


# ---- SVFT's own execution strategy ---------------------------------------------------------


def reference(node, use):
    """The SVFT authors' layer: W = U · ((Σ + M) Vᵀ), the inner product sparse, rebuilt on
    every use (no caching); see `SVFTNode.reference_kernel`. For benchmarks."""
    if not reference.applies_to(node):
        return use.dense_merged()
    use.record("reference")
    return use.dense(node.reference_kernel())


reference.applies_to = lambda node: isinstance(node, SVFTNode)
register_strategy("reference", reference)
