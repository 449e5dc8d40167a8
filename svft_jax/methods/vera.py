"""VeRA (Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024), as an
adapter-protocol method.

W = W0 + Λ_b B Λ_d A,

with A: (r, d2) and B: (d1, r) frozen random matrices and only the scaling vectors d: (r,) and
b: (d1,) trained; b = 0 (so the model starts as W0), d = `d_initial` (0.1).

Initialisation as PEFT (and the paper's Kaiming init): ONE pair is drawn for the largest target
shape, A_full: (r, max d2) and B_full: (max d1, r), each U(±√(6/fan_in)) (kaiming-uniform with
a = 0; fan_in = max d2 for A, r for B), and every target uses the slices A_full[:, :d2],
B_full[:d1, :]. The largest shape is recorded in each node's plan, so a reload draws the same
matrices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from svft_jax._args import check_finite_number, check_positive_int, check_seed
from svft_jax.core._matmul import base_matmul, mm
from svft_jax.core._protocol import (
    AdapterNode,
    ArraySpec,
    Plan,
    adapter_node,
    frozen_field,
    trainable_field,
)
from svft_jax.core._rules import Method
from svft_jax.methods import _common


@dataclasses.dataclass(frozen=True)
class VeRAPlan(Plan):
    """One VeRA target: rank r, d's initial value, the seed and the (d1, d2) of the shared pair."""

    rank: int = 256
    d_initial: float = 0.1
    seed: int = 0
    shared_d1: int = 0
    shared_d2: int = 0

    def arrays(self) -> dict:
        """The A, B slices are one buffer per shape (`shared`), counted once by `size`."""
        layout, stack = self.layout, self.layout.stack_shape
        pair = (self.shared_d1, self.shared_d2, self.rank, self.seed, layout.d1, layout.d2)
        return {"shared_a": ArraySpec((self.rank, layout.d2), "float32", "frozen", shared=("a", *pair)),
                "shared_b": ArraySpec((layout.d1, self.rank), "float32", "frozen", shared=("b", *pair)),
                "scale_d": ArraySpec((*stack, self.rank), "float32", "trainable"),
                "scale_b": ArraySpec((*stack, layout.d1), "float32", "trainable"),
                "base": ArraySpec(tuple(layout.shape), layout.dtype, "base")}

    def describe(self) -> str:
        return f"vera(r={self.rank})"


VeRAMeta = VeRAPlan  # alias kept for one release


def shared_matrices(d1: int, d2: int, rank: int, seed: int):
    """The frozen (A: (r, d2), B: (d1, r)) pair of the largest shape; a pure function of its args."""
    key_a, key_b = jax.random.split(jax.random.key(seed))
    return (_common.kaiming_uniform(key_a, (rank, d2), fan_in=d2, gain=math.sqrt(2.0)),
            _common.kaiming_uniform(key_b, (d1, rank), fan_in=rank, gain=math.sqrt(2.0)))


@adapter_node(method="vera")
class VeRANode(AdapterNode):
    """One VeRA-adapted kernel.

    Children: shared_a (r, d2), shared_b (d1, r) frozen (slices of the shared pair, one buffer
    per target shape); scale_d (*stack, r) and scale_b (*stack, d1) trainable float32; base W0.
    """

    plan_cls = VeRAPlan
    axis_roles = {"shared_a": (None, "in"), "shared_b": ("out", None), "scale_b": ("out",)}
    shared_fields = ("shared_a", "shared_b")  # one pair for all layers of a stack

    shared_a: Any = frozen_field()
    shared_b: Any = frozen_field()
    scale_d: Any = trainable_field()
    scale_b: Any = trainable_field()
    base: Any = frozen_field()
    meta: VeRAPlan = None

    def delta(self):
        """ΔW = Λ_b B Λ_d A, float32: (*stack, d1, d2)."""
        scaled_b = jnp.asarray(self.shared_b, jnp.float32) * jnp.asarray(self.scale_d, jnp.float32)[..., None, :]
        return jnp.asarray(self.scale_b, jnp.float32)[..., None] * _common.low_rank_product(scaled_b, self.shared_a)

    def matmul(self, x, *, precision=None, preferred_element_type=None):
        """x W0ᵀ + ((x Aᵀ) ⊙ d) Bᵀ ⊙ b."""
        h = mm(x, jnp.swapaxes(self.shared_a, -1, -2), precision, preferred_element_type)
        h = (h * jnp.asarray(self.scale_d, h.dtype)).astype(x.dtype)
        delta = mm(h, jnp.swapaxes(self.shared_b, -1, -2), precision, preferred_element_type)
        delta = delta * jnp.asarray(self.scale_b, delta.dtype)
        return base_matmul(self.base, self.layout, x, precision, preferred_element_type) + delta

    @classmethod
    def build(cls, plans, kernels, *, factors=None):
        pairs: dict[tuple, tuple] = {}
        slices: dict[tuple, tuple] = {}
        nodes = {}
        for plan in plans:
            pair_key = (plan.shared_d1, plan.shared_d2, plan.rank, plan.seed)
            if pair_key not in pairs:
                pairs[pair_key] = shared_matrices(*pair_key)
            layout = plan.layout
            slice_key = (*pair_key, layout.d1, layout.d2)
            if slice_key not in slices:  # same-shaped targets share one buffer
                full_a, full_b = pairs[pair_key]
                slices[slice_key] = (full_a[:, : layout.d2], full_b[: layout.d1, :])
            a, b = slices[slice_key]
            stack = layout.stack_shape
            nodes[plan.path] = cls(
                shared_a=a, shared_b=b, scale_d=jnp.full((*stack, plan.rank), plan.d_initial, jnp.float32),
                scale_b=jnp.zeros((*stack, layout.d1), jnp.float32), base=kernels[plan.path], meta=plan)
        return nodes


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeRA(Method):
    """VeRA's config: rank r of the shared random pair (it may exceed min(d1, d2)), the initial
    value of d, and the seed of the pair."""

    node: ClassVar[type] = VeRANode
    rank: int = 256
    d_initial: float = 0.1
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "rank", check_positive_int(self.rank, "rank"))
        object.__setattr__(self, "seed", check_seed(self.seed))
        object.__setattr__(self, "d_initial", check_finite_number(self.d_initial, "d_initial"))

    def plan(self, target) -> VeRAPlan:
        return self.plans([target])[0]

    def plans(self, targets) -> list[VeRAPlan]:
        """One pair for all of this config's targets, drawn at their largest shape (PEFT)."""
        d1, d2 = max(t.layout.d1 for t in targets), max(t.layout.d2 for t in targets)
        return [VeRAPlan(path=t.path, layout=t.layout, rank=self.rank, d_initial=self.d_initial, seed=self.seed,
                         shared_d1=d1, shared_d2=d2) for t in targets]


def apply(
    params,
    rank: int = 256,
    *,
    d_initial: float = 0.1,
    targets: str | None = None,
    exclude: str | None = None,
    layouts: Mapping[str, Any] | None = None,
    extra: str | None = None,
    seed: int = 0,
):
    """Replace target kernels by VeRA nodes: W = W0 + Λ_b B Λ_d A.

    Args:
      params: any parameter pytree.
      rank: r of the shared random matrices (the paper uses 256 for RoBERTa-base); it may
        exceed min(d1, d2).
      d_initial: initial value of every entry of d (finite).
      targets, exclude, layouts, extra: as in `svft_jax.methods.lora.apply`.
      seed: seeds the shared pair A, B (drawn once at the largest target shape, PEFT's scheme).
    Returns:
      The pytree with each target leaf replaced by a `VeRANode`.
    """
    config = VeRA(rank=rank, d_initial=d_initial, seed=seed)
    return _common.keyword_apply(params, config, targets=targets, exclude=exclude, layouts=layouts, extra=extra)
