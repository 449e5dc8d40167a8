"""The adapter-set node: one frozen SVD of a kernel shared by K named SVFT adapters.

Every SVFT adapter of one base has the same frozen U, s, V (and W0): they are a function of the
base weight. Adapters differ only in their coefficients on Ω. A set node therefore stores

  u:       (*stack, d1, r)   frozen, one copy
  s:       (*stack, r)       frozen, one copy
  v:       (*stack, d2, r)   frozen, one copy
  base:    kernel or None    frozen W0, one copy
  bank:    (K, *stack, n)    frozen: adapter k's values of M on the union Ω (n = |∪_k Ω_k|),
                             zero off adapter k's own Ω
  weights: (K,) or (B, K)    which adapters are on, as data: one-hot = one active adapter,
                             zeros = the base model, any vector = a mixture Σ_k w_k M_k,
                             (B, K) = per-example routing (row b is example b's weights)

so that  W(w) = W0 + U (Σ_k w_k M_k) Vᵀ  — ΔW is linear in M, so a mixture of adapters is the
adapter of the mixed coefficients. Because the choice of adapter is an array (not aux data),
switching adapters between calls of a jitted function does not retrace, and per-example
routing is  y_b = W0 x_b + U (M_b (Vᵀ x_b))  with M_b = Σ_k w_bk M_k on Ω: no dense weight is
formed per adapter.

`weights` is the node's only trainable field: `svft_jax.optimizer` on a set tree learns the
mixing weights over a frozen bank (Transformer²'s adaptation step); to train one adapter's own
coefficients, `extract` it to an ordinary SVFT tree (see `svft_jax.adapters.extract`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax.core._matmul import base_matmul, mm
from svft_jax.core._protocol import (
    AdapterNode,
    adapter_node,
    digest,
    frozen_field,
    trainable_field,
)
from svft_jax.core.layout import KernelLayout
from svft_jax.methods.svft._node import StaticIndices, SVFTMeta, SVFTPlan

# Ω with at most this many distinct diagonals (j − i) is mixed by shifted copies of h.
MAX_DIAGONALS = 32


@dataclasses.dataclass(frozen=True)
class SetMeta:
    """Static description of one set node (hashable: jit caches on it).

    Attributes:
      plan: the shared `SVFTPlan` of the base (path, layout, rank, dtypes, SVD settings; its
        pattern fields are those of the first adapter added).
      rows, cols: the union Ω, (n,) indices into the r × r grid of M.
      names: the adapters' names, in bank order.
      members: each adapter's own `SVFTMeta` (its pattern and Ω), in bank order.
      positions: for each adapter, where its own Ω sits in the union: (|Ω_k|,) indices.
    """

    plan: SVFTPlan
    rows: StaticIndices
    cols: StaticIndices
    names: tuple[str, ...]
    members: tuple[SVFTMeta, ...]
    positions: tuple[StaticIndices, ...]

    @property
    def path(self) -> str:
        return self.plan.path

    @property
    def layout(self) -> KernelLayout:
        return self.plan.layout

    @property
    def rank(self) -> int:
        return self.plan.rank

    @property
    def num_entries(self) -> int:
        return int(self.rows.array.shape[-1])

    @property
    def layers(self) -> int:
        return self.plan.layers

    @property
    def key_id(self) -> int:
        return self.plan.key_id

    def to_config(self) -> dict:
        return {**self.plan.to_config(), "adapters": list(self.names),
                "members": [m.to_config() for m in self.members]}


@adapter_node(method="svft_set")
class AdapterSetNode(AdapterNode):
    """K SVFT adapters over one frozen SVD of a kernel. See the module docstring for shapes."""

    plan_cls = SVFTPlan

    def layer_slicer(self):
        """None: a stacked set node keeps its bank as (K, *stack, n), so slicing every field on
        axis 0 would cut adapters, not layers; inside a scan it is used densely instead (a routed
        one then raises, naming the fix)."""
        return None

    u: Any = frozen_field()
    s: Any = frozen_field()
    v: Any = frozen_field()
    base: Any = frozen_field()
    bank: Any = frozen_field()
    weights: Any = trainable_field()
    meta: SetMeta = None

    @property
    def routed(self) -> bool:
        """True when `weights` is (B, K): each example of a batch has its own adapter mix."""
        return jnp.ndim(self.weights) == 2

    def coefficients(self):
        """Σ_k w_k M_k on the union Ω: (*stack, n). Not defined for per-example weights."""
        if self.routed:
            raise ValueError(
                f"{self.path!r}: this set is routed per example (weights {tuple(self.weights.shape)}), so it has no "
                "single weight matrix. Run it through svft_jax.wrap(fn, strategy='routed') (or the node's matmul), "
                "or pick one adapter with svft_jax.adapters.select(tree, name) before merging.")
        return jnp.tensordot(jnp.asarray(self.weights, jnp.float32), self.bank, axes=1)

    def dense_coefficients(self):
        """The mixed M as a dense (*stack, r, r) float32 array (inspection, not the hot path)."""
        r = self.meta.rank
        c = self.coefficients()
        dense = jnp.zeros((*c.shape[:-1], r, r), jnp.float32)
        return dense.at[..., self.meta.rows.array, self.meta.cols.array].add(c)

    def delta(self):
        """ΔW = U (Σ_k w_k M_k) Vᵀ, float32 (*stack, d1, d2)."""
        u = jnp.asarray(self.u, jnp.float32)
        v = jnp.asarray(self.v, jnp.float32)
        return (u @ self.dense_coefficients()) @ jnp.swapaxes(v, -1, -2)

    def base_matrix(self):
        if self.base is None:
            u = jnp.asarray(self.u, jnp.float32)
            s = jnp.asarray(self.s, jnp.float32)
            return (u * s[..., None, :]) @ jnp.swapaxes(jnp.asarray(self.v, jnp.float32), -1, -2)
        return super().base_matrix()

    def _mix(self, h, coeffs):
        """z = M h for h (..., r) and coefficients on Ω broadcastable to (..., n): z_i = Σ_{(i,j)∈Ω} M_ij h_j.

        Ω is walked by diagonals (offset j − i): with few offsets (plain: 1, banded: 2d + 1) z is
        a sum of shifted, scaled copies of h — B·T·r multiply-adds per offset, no scatter over
        tokens. Otherwise a gather of h at Ω and one scatter-add into r.
        """
        rows, cols = self.meta.rows.array, self.meta.cols.array
        r = self.meta.rank
        offsets, which = np.unique(cols.astype(np.int64) - rows, return_inverse=True)
        if len(offsets) <= MAX_DIAGONALS:
            # per-diagonal coefficient vectors, (..., diagonals, r): a scatter over Ω only
            diagonal = jnp.zeros((*coeffs.shape[:-1], len(offsets), r), jnp.float32).at[..., which, rows].add(coeffs)
            pad = int(np.max(np.abs(offsets)))
            padded = jnp.pad(h, [(0, 0)] * (h.ndim - 1) + [(pad, pad)]) if pad else h
            z = 0.0
            for j, offset in enumerate(offsets):
                start = pad + int(offset)
                z = z + diagonal[..., j, :] * jax.lax.slice_in_dim(padded, start, start + r, axis=-1)  # h_{i+offset}
            return z
        contributions = h[..., cols] * coeffs  # (..., n)
        z = jnp.zeros((*contributions.shape[:-1], r), contributions.dtype)
        return z.at[..., rows].add(contributions)

    def matmul(self, x, *, precision=None, preferred_element_type=None):
        """x Wᵀ without forming W: x (..., d2) -> (..., d1).

        With per-example weights (B, K), x's leading axis is the batch: x (B, ..., d2), and
        example b gets y_b = W0 x_b + U (M_b (Vᵀ x_b)), M_b = Σ_k w_bk M_k on Ω — the cost is
        one factored product plus B·T·|Ω| multiply-adds, whatever K is.
        """
        if self.layout.stack_ndim:
            raise ValueError(f"{self.path!r}: matmul of a stacked kernel {self.layout.shape}; slice the layer first.")
        h = mm(x, self.v, precision, preferred_element_type).astype(jnp.float32)  # (..., r)
        if self.routed:
            batch = self.weights.shape[0]
            if x.ndim < 2 or x.shape[0] != batch:
                raise ValueError(
                    f"{self.path!r}: routing ids cover {batch} examples but the activation has shape {tuple(x.shape)}; "
                    "the leading axis of every adapted layer's input must be the batch routed with "
                    "svft_jax.adapters.route(tree, adapter_ids).")
            coeffs = jnp.asarray(self.weights, jnp.float32) @ self.bank  # (B, n)
            coeffs = coeffs.reshape(batch, *([1] * (x.ndim - 2)), coeffs.shape[-1])
        else:
            coeffs = self.coefficients()
        z = self._mix(h, coeffs)
        if self.base is None:
            z = z + h * jnp.asarray(self.s, jnp.float32)
        y = mm(z.astype(x.dtype), jnp.swapaxes(self.u, -1, -2), precision, preferred_element_type)
        if self.base is not None:
            y = y + base_matmul(self.base, self.layout, x, precision, preferred_element_type).astype(y.dtype)
        return y

    def bank_fingerprint(self) -> dict:
        """{"bank_sha256": hex}: what the mixing weights mean beyond the base. Weights trained over
        one bank are another model over another (an adapter re-trained or replaced under the same
        name), so `TrainCheckpointer(frozen=)` records this and refuses a restore onto another bank."""
        return {"bank_sha256": digest(np.asarray(jax.device_get(self.bank)))}

    @property
    def update_rank(self) -> int:
        return self.meta.rank

    @property
    def entries_per_layer(self) -> int:
        return self.meta.num_entries

    def describe(self) -> str:
        return f"svft-set(K={len(self.meta.names)}, |∪Ω|={self.meta.num_entries})"

    @classmethod
    def build(cls, plans, kernels, *, factors=None):
        raise TypeError("AdapterSetNode is built from SVFT adapters: use svft_jax.adapters.create(adapted, name).")

    @classmethod
    def from_records(cls, records, kernels, *, factors=None, where="record", ignore=()):
        raise TypeError(f"{where}: adapter sets are saved as one ordinary SVFT adapter file per adapter; "
                        "load them with svft_jax.adapters.load(folder, base_params).")

    def sketch(self):
        raise TypeError("an adapter set is not one adapter file: save it with svft_jax.adapters.save(folder, tree).")


def is_set_node(x) -> bool:
    return isinstance(x, AdapterSetNode)

