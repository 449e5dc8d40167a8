"""The SVFT node: the pytree that replaces one target kernel.

Children (arrays, seen by jit/grad/vmap/pmap):
  u:    (*stack, d1, r)   frozen left singular vectors (factor_dtype)
  s:    (*stack, r)       frozen singular values (factor_dtype)
  v:    (*stack, d2, r)   frozen right singular vectors (factor_dtype)
  m:    (*stack, |Ω|)     trainable values of M on Ω (float32)
  gate: (*stack,) or None trainable gate of init="reference": M = m · sigmoid(gate)
  base: kernel or None    frozen W0 in the kernel's own layout and dtype
Aux data (static, hashable, so jit caches on it): `SVFTMeta`.

The adapted weight is W = W0 + U M Vᵀ (with `base`), or U (diag(s) + M) Vᵀ when the
full-rank factors stand in for W0 (keep_base=False).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax.patterns import PatternOptions, get_pattern
from svft_jax.transform.layout import KernelLayout


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
        return (
            isinstance(other, StaticIndices)
            and self._hash == other._hash
            and np.array_equal(self.array, other.array)
        )

    def __repr__(self) -> str:
        return f"StaticIndices(shape={self.array.shape})"


@dataclasses.dataclass(frozen=True)
class SVFTMeta:
    """Static description of one adapted kernel.

    Attributes:
      path: '/'-joined parameter path of the kernel.
      pattern: registered pattern name.
      options: the pattern options (d, k, seed).
      rank: r, the number of singular triplets kept.
      layout: how the kernel maps to W (*stack, d1, d2).
      rows, cols: Ω as indices into M, shape (|Ω|,) or (*stack, |Ω|) for per-layer patterns.
      init: "zeros" or "reference".
      factor_dtype: dtype name of u, s, v.
    """

    path: str
    pattern: str
    options: PatternOptions
    rank: int
    layout: KernelLayout
    rows: StaticIndices
    cols: StaticIndices
    init: str
    factor_dtype: str

    @property
    def num_entries(self) -> int:
        """|Ω| per layer."""
        return int(self.rows.array.shape[-1])

    @property
    def per_layer_indices(self) -> bool:
        return self.rows.array.ndim > 1

    @property
    def full_rank(self) -> bool:
        return self.rank == min(self.layout.d1, self.layout.d2)


class AdapterNode:
    """Base class of every node that stands in for one kernel (SVFT here, LoRA/DoRA/VeRA in
    `svft_jax.baselines`). `merge`, `split`, `combine`, `labels`, `optimizer` and `summary`
    work on any subclass that is a registered pytree dataclass and defines:

      DATA_FIELDS: names of its array children; TRAINABLE_FIELDS: the trainable subset.
      merged_kernel(): the dense kernel (original layout and dtype).
      num_trainable: trainable scalars. kernel_shape: the original kernel's shape.
      summary_row(): (path, W shape text, method text, rank text, entries text).
    """

    DATA_FIELDS: ClassVar[tuple[str, ...]] = ()
    TRAINABLE_FIELDS: ClassVar[tuple[str, ...]] = ()

    def merged_kernel(self):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_trainable(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def kernel_shape(self) -> tuple[int, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def summary_row(self) -> tuple[str, ...]:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SVFTNode(AdapterNode):
    """One adapted kernel. See the module docstring for shapes."""

    DATA_FIELDS = ("u", "s", "v", "m", "gate", "base")
    TRAINABLE_FIELDS = ("m", "gate")

    u: Any
    s: Any
    v: Any
    m: Any
    gate: Any
    base: Any
    meta: SVFTMeta

    def coefficients(self):
        """The values of M on Ω: m, or m · sigmoid(gate) for init="reference". (*stack, |Ω|)."""
        if self.gate is None:
            return self.m
        return self.m * jax.nn.sigmoid(self.gate)[..., None].astype(self.m.dtype)

    @property
    def num_trainable(self) -> int:
        """Trainable scalars in this node: |Ω| per layer, plus the gate(s)."""
        count = int(np.prod(self.meta.layout.stack_shape, dtype=int)) * self.meta.num_entries
        if self.gate is not None:
            count += int(np.prod(self.meta.layout.stack_shape, dtype=int))
        return count

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return self.meta.layout.shape

    def merged_kernel(self):
        """The adapted kernel in its original layout and dtype."""
        from svft_jax.transform.merge import merged_kernel

        return merged_kernel(self)

    def summary_row(self) -> tuple[str, ...]:
        meta = self.meta
        stack = "×".join(map(str, meta.layout.stack_shape))
        shape = f"{stack + '×' if stack else ''}{meta.layout.d1}×{meta.layout.d2}"
        detail = {"banded": f"d={meta.options.d}", "random": f"seed={meta.options.seed}"}.get(meta.pattern, "")
        method = f"svft-{meta.pattern}({detail})" if detail else f"svft-{meta.pattern}"
        return (meta.path, shape, method, str(meta.rank), str(meta.num_entries))

    def dense_coefficients(self):
        """M as a dense (*stack, r, r) array. For tests and inspection, not the hot path."""
        r = self.meta.rank
        coeffs = jnp.asarray(self.coefficients(), jnp.float32)
        stack = self.meta.layout.stack_shape
        flat = coeffs.reshape(-1, self.meta.num_entries)
        rows = np.broadcast_to(self.meta.rows.array, (*stack, self.meta.num_entries)).reshape(flat.shape)
        cols = np.broadcast_to(self.meta.cols.array, (*stack, self.meta.num_entries)).reshape(flat.shape)
        layers = np.arange(flat.shape[0])[:, None]
        dense = jnp.zeros((flat.shape[0], r, r), jnp.float32).at[layers, rows, cols].add(flat)
        return dense.reshape(*stack, r, r)


jax.tree_util.register_dataclass(
    SVFTNode, data_fields=list(SVFTNode.DATA_FIELDS), meta_fields=["meta"]
)


def is_node(x) -> bool:
    """True for any adapter node — SVFT or a baseline (use as `is_leaf=` in tree maps)."""
    return isinstance(x, AdapterNode)


def pattern_spec(node: SVFTNode):
    return get_pattern(node.meta.pattern)
