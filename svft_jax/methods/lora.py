"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022), as an
adapter-protocol method: its plan, node, init, factored matmul and `apply`.

W = W0 + s B A with A: (r, d2), B: (d1, r) trainable, W0 frozen, s = α / r (or α / √r with
rsLoRA, Kalajdzievski 2023, PEFT's `use_rslora`). A starts from PyTorch's Linear default
(kaiming-uniform, b = 1/√d2, as PEFT) and B = 0, so the adapted model starts as the base model.
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


@dataclasses.dataclass(frozen=True)
class LoRAPlan(Plan):
    """One LoRA target: rank r, α, the seed of A, and rsLoRA scaling."""

    rank: int = 8
    alpha: float = 16.0
    seed: int = 0
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def arrays(self) -> dict:
        layout, stack = self.layout, self.layout.stack_shape
        return {"a": ArraySpec((*stack, self.rank, layout.d2), "float32", "trainable"),
                "b": ArraySpec((*stack, layout.d1, self.rank), "float32", "trainable"),
                "base": ArraySpec(tuple(layout.shape), layout.dtype, "base")}

    def describe(self) -> str:
        return f"lora(r={self.rank}, α={self.alpha:g}{', rs' if self.use_rslora else ''})"


LoRAMeta = LoRAPlan  # the plan is the node's whole static description (alias kept for one release)


def init_factors(plan, rank: int, seed: int):
    """(a, b): A kaiming-uniform (*stack, r, d2), B zeros (*stack, d1, r), both float32."""
    layout = plan.layout
    stack = layout.stack_shape
    key = jax.random.fold_in(jax.random.key(seed), plan.key_id)
    a = _common.kaiming_uniform(key, (*stack, rank, layout.d2), fan_in=layout.d2)
    return a, jnp.zeros((*stack, layout.d1, rank), jnp.float32)


@adapter_node(method="lora")
class LoRANode(AdapterNode):
    """One LoRA-adapted kernel: a (*stack, r, d2), b (*stack, d1, r) trainable float32; base W0."""

    plan_cls = LoRAPlan
    axis_roles = {"a": (None, "in"), "b": ("out", None)}

    a: Any = trainable_field()
    b: Any = trainable_field()
    base: Any = frozen_field()
    meta: LoRAPlan = None

    def delta(self):
        """ΔW = s B A, float32: (*stack, d1, d2)."""
        return self.meta.scaling * _common.low_rank_product(self.b, self.a)

    def matmul(self, x, *, precision=None, preferred_element_type=None):
        """x W0ᵀ + s (x Aᵀ) Bᵀ."""
        h = mm(x, jnp.swapaxes(self.a, -1, -2), precision, preferred_element_type)
        delta = mm(h.astype(x.dtype), jnp.swapaxes(self.b, -1, -2), precision, preferred_element_type)
        return base_matmul(self.base, self.layout, x, precision, preferred_element_type) + self.meta.scaling * delta

    @classmethod
    def build(cls, plans, kernels, *, factors=None):
        nodes = {}
        for plan in plans:
            a, b = init_factors(plan, plan.rank, plan.seed)
            nodes[plan.path] = cls(a=a, b=b, base=kernels[plan.path], meta=plan)
        return nodes


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA(Method):
    """LoRA's config: rank r, α (scale α / r, or α / √r with `use_rslora`), the seed of A.
    Validated when built."""

    node: ClassVar[type] = LoRANode
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0
    use_rslora: bool = False

    def __post_init__(self):
        object.__setattr__(self, "rank", check_positive_int(self.rank, "rank"))
        object.__setattr__(self, "seed", check_seed(self.seed))
        object.__setattr__(self, "alpha", check_finite_number(self.alpha, "alpha"))
        object.__setattr__(self, "use_rslora", check_bool(self.use_rslora, "use_rslora", "LoRA"))

    def plan(self, target) -> LoRAPlan:
        return LoRAPlan(path=target.path, layout=target.layout, rank=self.rank, alpha=self.alpha, seed=self.seed,
                        use_rslora=self.use_rslora)


def apply(
    params,
    rank: int = 8,
    alpha: float = 16.0,
    *,
    targets: str | None = None,
    exclude: str | None = None,
    layouts: Mapping[str, Any] | None = None,
    extra: str | None = None,
    seed: int = 0,
    use_rslora: bool = False,
):
    """Replace target kernels by LoRA nodes: W = W0 + (α / r) B A.

    Args:
      params: any parameter pytree (Flax linen, NNX, HF `model.params`).
      rank: r, the rank of the update.
      alpha: α; the update is scaled by α / r (PEFT's default convention), α / √r with rsLoRA.
      targets, exclude: regexes as in `svft_jax.apply` (None: the same default targets).
      layouts: {regex: layout} for kernels whose axes cannot be inferred.
      extra: regex of leaves trained in full (a new head), marked `Trainable` in the result.
      seed: seeds A (combined with a checksum of each path, so targets differ).
      use_rslora: scale by α / √r (rank-stabilised LoRA) instead of α / r.
    Returns:
      The pytree with each target leaf replaced by a `LoRANode`.
    """
    config = LoRA(rank=rank, alpha=alpha, seed=seed, use_rslora=use_rslora)
    return _common.keyword_apply(params, config, targets=targets, exclude=exclude, layouts=layouts, extra=extra)
