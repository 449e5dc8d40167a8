"""A new adapter method in one file — the whole of it: its plan (what its node holds), its node
(math), its typed config (options, validated), registered by the decorator and the subclass.

IA³-style output scaling with a rank-1 twist, W = W0 + diag(g) W0 + u vᵀ · s, kept small on
purpose: g (d1,) and u (d1,), v (d2,) trainable, s a fixed float option. Used by
tests/test_method_one_file.py, which takes it through size, adapt, save, load and wrap.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

import svft_jax
from svft_jax.core import ArraySpec


@dataclasses.dataclass(frozen=True)
class GainPlan(svft_jax.Plan):
    scale: float = 1.0

    def arrays(self) -> dict:
        stack, d1, d2 = self.layout.stack_shape, self.layout.d1, self.layout.d2
        return {"gain": ArraySpec((*stack, d1), "float32", "trainable"),
                "u": ArraySpec((*stack, d1), "float32", "trainable"),
                "v": ArraySpec((*stack, d2), "float32", "trainable"),
                "base": ArraySpec(tuple(self.layout.shape), self.layout.dtype, "base")}

    def describe(self) -> str:
        return f"gain(s={self.scale:g})"

    @property
    def update_rank(self) -> int:
        return 1


@svft_jax.adapter_node(method="example_gain")
class GainNode(svft_jax.AdapterNode):
    plan_cls = GainPlan

    gain: Any = svft_jax.trainable_field()  # (*stack, d1)
    u: Any = svft_jax.trainable_field()     # (*stack, d1)
    v: Any = svft_jax.trainable_field()     # (*stack, d2)
    base: Any = svft_jax.frozen_field()
    meta: GainPlan = None

    def delta(self):
        """diag(g) W0 + s u vᵀ: (*stack, d1, d2) float32."""
        return self.gain[..., :, None] * self.base_matrix() + self.meta.scale * self.u[..., :, None] * self.v[..., None, :]

    def matmul(self, x, *, precision=None, preferred_element_type=None):
        """x Wᵀ = (x W0ᵀ)(1 + g) + s (x·v) u, W never formed. x: (..., d2) -> (..., d1)."""
        w0 = self.base_matrix()
        base = jnp.einsum("...i,oi->...o", x, w0, precision=precision)
        return base * (1 + self.gain) + self.meta.scale * (x @ self.v)[..., None] * self.u

    @classmethod
    def build(cls, plans, kernels, *, factors=None):
        return {p.path: cls(gain=jnp.zeros((*p.layout.stack_shape, p.layout.d1), jnp.float32),
                            u=jnp.zeros((*p.layout.stack_shape, p.layout.d1), jnp.float32),
                            v=jnp.ones((*p.layout.stack_shape, p.layout.d2), jnp.float32),
                            base=kernels[p.path], meta=p) for p in plans}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gain(svft_jax.Method):
    node: ClassVar[type] = GainNode
    scale: float = 1.0

    def __post_init__(self):
        if not isinstance(self.scale, int | float) or isinstance(self.scale, bool):
            raise TypeError(f"Gain(scale=...) must be a number, got {self.scale!r}.")

    def plan(self, target) -> GainPlan:
        return GainPlan(path=target.path, layout=target.layout, scale=float(self.scale))
