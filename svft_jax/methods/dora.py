"""DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024), as an
adapter-protocol method.

W = m ⊙ V / ‖V‖,  V = W0 + s B A  (s = α / r, or α / √r with rsLoRA),

with the magnitude m trainable and initialised to ‖W0‖, and the direction updated by LoRA.

Norm axis: one norm per output unit — PEFT's `weight.norm(p=2, dim=1)` for a PyTorch Linear
(out, in), i.e. here the norm of each *row* of W: (d1 = out, d2 = in); m: (*stack, d1).
Norms are computed scale-safely (each row divided by its largest entry first), so weights at
scale 1e20 do not overflow and at 1e-20 do not underflow to "all zero".
Gradient through the norm: treated as a constant in the backward pass (DoRA §4.3, PEFT) by
default; `detach_norm=False` gives the exact gradient.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from svft_jax._args import check_bool, check_finite_number, check_positive_int, check_seed
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
from svft_jax.methods.lora import init_factors


@dataclasses.dataclass(frozen=True)
class DoRAPlan(Plan):
    """One DoRA target: the LoRA direction's rank, α, seed, rsLoRA, and `detach_norm`."""

    rank: int = 1
    alpha: float = 2.0
    seed: int = 0
    use_rslora: bool = False
    detach_norm: bool = True

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def arrays(self) -> dict:
        layout, stack = self.layout, self.layout.stack_shape
        return {"magnitude": ArraySpec((*stack, layout.d1), "float32", "trainable"),
                "a": ArraySpec((*stack, self.rank, layout.d2), "float32", "trainable"),
                "b": ArraySpec((*stack, layout.d1, self.rank), "float32", "trainable"),
                "base": ArraySpec(tuple(layout.shape), layout.dtype, "base")}

    def describe(self) -> str:
        return f"dora(r={self.rank}, α={self.alpha:g}{', rs' if self.use_rslora else ''})"


DoRAMeta = DoRAPlan  # alias kept for one release


def row_scales(matrix):
    """max_j |W_ij| per row (1 where a row is all zero): (*stack, d1, d2) -> (*stack, d1)."""
    peak = jnp.max(jnp.abs(matrix), axis=-1)
    return jnp.where(peak > 0, peak, 1.0)


def row_norms(matrix):
    """‖W_i,:‖₂ per output unit, without overflow or underflow: (*stack, d1, d2) -> (*stack, d1)."""
    scale = jax.lax.stop_gradient(row_scales(matrix))
    return scale * jnp.sqrt(jnp.sum(jnp.square(matrix / scale[..., None]), axis=-1))


@adapter_node(method="dora")
class DoRANode(AdapterNode):
    """One DoRA-adapted kernel.

    Children: magnitude (*stack, d1), a (*stack, r, d2), b (*stack, d1, r) trainable float32
    (b = 0 at init); base W0 frozen, in its own layout and dtype.
    """

    plan_cls = DoRAPlan
    axis_roles = {"magnitude": ("out",), "a": (None, "in"), "b": ("out", None)}

    magnitude: Any = trainable_field()
    a: Any = trainable_field()
    b: Any = trainable_field()
    base: Any = frozen_field()
    meta: DoRAPlan = None

    def weight(self):
        """The adapted W, float32: (*stack, d1, d2)."""
        direction = self.base_matrix() + self.meta.scaling * _common.low_rank_product(self.b, self.a)
        norm = row_norms(direction)
        if self.meta.detach_norm:
            norm = jax.lax.stop_gradient(norm)
        return direction * (jnp.asarray(self.magnitude, jnp.float32) / norm)[..., None]

    def delta(self):
        return self.weight() - self.base_matrix()

    def matmul(self, x, *, precision=None, preferred_element_type=None):
        """(m / ‖W0 + s B A‖_row) ⊙ (x W0ᵀ + s (x Aᵀ) Bᵀ).

        The row norms come from c_i² (‖w̃_i‖² + 2 s b̃_i·(A w̃_i) + s² b̃_i (A Aᵀ) b̃_iᵀ) with each
        row scaled by its largest entry c_i (w̃ = w0 / c, b̃ = b / c): W0 Aᵀ costs d1·d2·r, as a
        merge would, but W is never stored and nothing overflows.
        """
        scale = self.meta.scaling
        w0 = self.base_matrix()  # (d1, d2)
        c = jax.lax.stop_gradient(row_scales(w0))
        w0_scaled = w0 / c[:, None]
        a = jnp.asarray(self.a, jnp.float32)
        b = jnp.asarray(self.b, jnp.float32) / c[:, None]
        w0_at = w0_scaled @ a.T  # (d1, r)
        squared = (jnp.sum(w0_scaled * w0_scaled, axis=-1) + 2 * scale * jnp.sum(b * w0_at, axis=-1)
                   + scale**2 * jnp.sum((b @ (a @ a.T)) * b, axis=-1))
        norm = c * jnp.sqrt(jnp.maximum(squared, 0.0))
        if self.meta.detach_norm:
            norm = jax.lax.stop_gradient(norm)
        h = mm(x, jnp.swapaxes(self.a, -1, -2), precision, preferred_element_type)
        y = base_matmul(self.base, self.layout, x, precision, preferred_element_type)
        y = y + scale * mm(h.astype(x.dtype), jnp.swapaxes(self.b, -1, -2), precision, preferred_element_type)
        return y * (jnp.asarray(self.magnitude, jnp.float32) / norm).astype(y.dtype)

    @classmethod
    def build(cls, plans, kernels, *, factors=None):
        nodes = {}
        for plan in plans:
            kernel = kernels[plan.path]
            magnitude = row_norms(plan.layout.to_matrix(jnp.asarray(kernel, jnp.float32)))
            if not bool(jnp.all(magnitude > 0)):
                raise ValueError(f"parameter {plan.path!r} has an output unit whose weights are all zero; DoRA's direction W/‖W‖ is undefined there. Exclude it with `exclude`.")
            a, b = init_factors(plan, plan.rank, plan.seed)
            nodes[plan.path] = cls(magnitude=magnitude, a=a, b=b, base=kernel, meta=plan)
        return nodes


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoRA(Method):
    """DoRA's config: rank r of the direction update, α (None: 2r, PEFT's common α/r = 2),
    the seed of A, rsLoRA scaling, and whether the norm is detached (DoRA §4.3, PEFT)."""

    node: ClassVar[type] = DoRANode
    rank: int = 1
    alpha: float | None = None
    seed: int = 0
    use_rslora: bool = False
    detach_norm: bool = True

    def __post_init__(self):
        rank = check_positive_int(self.rank, "rank")
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "seed", check_seed(self.seed))
        object.__setattr__(self, "alpha", check_finite_number(2.0 * rank if self.alpha is None else self.alpha, "alpha"))
        object.__setattr__(self, "use_rslora", check_bool(self.use_rslora, "use_rslora", "DoRA"))
        object.__setattr__(self, "detach_norm", check_bool(self.detach_norm, "detach_norm", "DoRA"))

    def plan(self, target) -> DoRAPlan:
        return DoRAPlan(path=target.path, layout=target.layout, rank=self.rank, alpha=self.alpha, seed=self.seed,
                        use_rslora=self.use_rslora, detach_norm=self.detach_norm)


def apply(
    params,
    rank: int = 1,
    alpha: float | None = None,
    *,
    targets: str | None = None,
    exclude: str | None = None,
    layouts: Mapping[str, Any] | None = None,
    extra: str | None = None,
    seed: int = 0,
    detach_norm: bool = True,
    use_rslora: bool = False,
):
    """Replace target kernels by DoRA nodes: W = m ⊙ (W0 + s B A) / ‖W0 + s B A‖.

    Args:
      params: any parameter pytree.
      rank: r of the LoRA direction update.
      alpha: α (default 2r, PEFT's common choice of α/r = 2).
      targets, exclude, layouts, extra, seed, use_rslora: as in `svft_jax.methods.lora.apply`.
      detach_norm: treat the norm as a constant in the backward pass (DoRA §4.3, PEFT).
    Returns:
      The pytree with each target leaf replaced by a `DoRANode`.
    Raises:
      ValueError if a target has an all-zero output row (its direction is undefined).
    """
    config = DoRA(rank=rank, alpha=alpha, seed=seed, detach_norm=detach_norm, use_rslora=use_rslora)
    return _common.keyword_apply(params, config, targets=targets, exclude=exclude, layouts=layouts, extra=extra)
