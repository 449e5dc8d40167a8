"""VeRA (Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024).

W = W0 + Λ_b B Λ_d A,

with A: (r, d2) and B: (d1, r) frozen random matrices shared by every target of the same
(d1, d2) shape (drawn once from `seed`), and only the scaling vectors d: (r,) and b: (d1,)
trained. As in the paper and PEFT: A, B kaiming-uniform, b = 0 (so the model starts as W0),
d = `d_initial` (0.1).

PEFT draws one A/B pair for the largest shape and slices it; drawing one pair per shape, as
here, gives the same distribution of updates (every entry is still i.i.d. uniform with the
right fan-in) and keeps each shape's matrices independent of which other shapes the model has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from svft_jax.baselines import _common
from svft_jax.transform.layout import KernelLayout
from svft_jax.transform.node import AdapterNode


@dataclasses.dataclass(frozen=True)
class VeRAMeta:
    """Static description of one VeRA target: path, layout, rank r."""

    path: str
    layout: KernelLayout
    rank: int


@dataclasses.dataclass(frozen=True)
class VeRANode(AdapterNode):
    """One VeRA-adapted kernel.

    Children:
      shared_a: (r, d2) frozen, shared by all targets of this shape (and all stacked layers).
      shared_b: (d1, r) frozen, shared likewise.
      scale_d:  (*stack, r) trainable, float32.
      scale_b:  (*stack, d1) trainable, float32 (zeros at init).
      base:     the frozen kernel W0 in its own layout and dtype.
    """

    DATA_FIELDS = ("shared_a", "shared_b", "scale_d", "scale_b", "base")
    TRAINABLE_FIELDS = ("scale_d", "scale_b")

    shared_a: Any
    shared_b: Any
    scale_d: Any
    scale_b: Any
    base: Any
    meta: VeRAMeta

    def delta_matrix(self):
        """ΔW = Λ_b B Λ_d A, float32: (*stack, d1, d2)."""
        scaled_b = jnp.asarray(self.shared_b, jnp.float32) * jnp.asarray(self.scale_d, jnp.float32)[..., None, :]
        return jnp.asarray(self.scale_b, jnp.float32)[..., None] * _common.low_rank_product(scaled_b, self.shared_a)

    def merged_kernel(self):
        return _common.add_delta(self.base, self.meta.layout, self.delta_matrix())

    @property
    def num_trainable(self) -> int:
        return _common.layers(self.meta.layout) * (self.meta.rank + self.meta.layout.d1)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return self.meta.layout.shape

    def summary_row(self) -> tuple[str, ...]:
        layout = self.meta.layout
        return (self.meta.path, _common.shape_text(layout), "vera", str(self.meta.rank),
                str(self.meta.rank + layout.d1))


jax.tree_util.register_dataclass(VeRANode, data_fields=list(VeRANode.DATA_FIELDS), meta_fields=["meta"])


def shared_matrices(d1: int, d2: int, rank: int, seed: int):
    """The frozen (A: (r, d2), B: (d1, r)) pair for one shape; a pure function of its args."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), d1), d2)
    key_a, key_b = jax.random.split(key)
    return (_common.kaiming_uniform(key_a, (rank, d2), fan_in=d2),
            _common.kaiming_uniform(key_b, (d1, rank), fan_in=rank))


def apply(
    params,
    rank: int = 256,
    *,
    d_initial: float = 0.1,
    targets: str | None = None,
    exclude: str | None = None,
    layouts: Mapping[str, Any] | None = None,
    seed: int = 0,
):
    """Replace target kernels by VeRA nodes: W = W0 + Λ_b B Λ_d A.

    Args:
      params: any parameter pytree.
      rank: r of the shared random matrices (the paper uses 256 for RoBERTa-base); it may
        exceed min(d1, d2).
      d_initial: initial value of every entry of d.
      targets, exclude, layouts: as in `svft_jax.baselines.lora.apply`.
      seed: seeds the shared A, B (one pair per (d1, d2) shape).
    Returns:
      The pytree with each target leaf replaced by a `VeRANode`.
    """
    rank = _common.check_positive_int(rank, "rank")
    seed = _common.check_seed(seed)
    if not isinstance(d_initial, int | float) or isinstance(d_initial, bool):
        raise TypeError(f"`d_initial` must be a number, got {type(d_initial).__name__}.")
    shared: dict[tuple[int, int], tuple] = {}
    nodes = {}
    for target in _common.plan_targets(params, targets, exclude, layouts):
        layout = target.layout
        shape = (layout.d1, layout.d2)
        if shape not in shared:
            shared[shape] = shared_matrices(*shape, rank, seed)
        a, b = shared[shape]
        stack = layout.stack_shape
        nodes[target.path] = VeRANode(
            shared_a=a, shared_b=b,
            scale_d=jnp.full((*stack, rank), float(d_initial), jnp.float32),
            scale_b=jnp.zeros((*stack, layout.d1), jnp.float32),
            base=target.kernel, meta=VeRAMeta(path=target.path, layout=layout, rank=rank),
        )
    return _common.replace_targets(params, nodes)
