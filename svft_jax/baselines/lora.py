"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022).

W = W0 + (α / r) B A with A: (r, d2) and B: (d1, r) trainable, W0 frozen. A starts from
PyTorch's Linear default (kaiming-uniform, as in PEFT) and B = 0, so the adapted model starts
exactly as the base model.
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
class LoRAMeta:
    """Static (hashable) description of one LoRA target.

    Attributes:
      path: '/'-joined parameter path. layout: how the kernel maps to W (*stack, d1, d2).
      rank: r. alpha: α; the update is scaled by α / r.
    """

    path: str
    layout: KernelLayout
    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class LoRANode(AdapterNode):
    """One LoRA-adapted kernel.

    Children:
      a:    (*stack, r, d2) trainable, float32.
      b:    (*stack, d1, r) trainable, float32 (zeros at init).
      base: the frozen kernel W0 in its own layout and dtype.
    """

    DATA_FIELDS = ("a", "b", "base")
    TRAINABLE_FIELDS = ("a", "b")

    a: Any
    b: Any
    base: Any
    meta: LoRAMeta

    def delta_matrix(self):
        """ΔW = (α / r) B A, float32: (*stack, d1, d2)."""
        return self.meta.scaling * _common.low_rank_product(self.b, self.a)

    def merged_kernel(self):
        return _common.add_delta(self.base, self.meta.layout, self.delta_matrix())

    @property
    def num_trainable(self) -> int:
        layout = self.meta.layout
        return _common.layers(layout) * self.meta.rank * (layout.d1 + layout.d2)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return self.meta.layout.shape

    def summary_row(self) -> tuple[str, ...]:
        layout = self.meta.layout
        return (self.meta.path, _common.shape_text(layout), f"lora(α={self.meta.alpha:g})",
                str(self.meta.rank), str(self.meta.rank * (layout.d1 + layout.d2)))


jax.tree_util.register_dataclass(LoRANode, data_fields=list(LoRANode.DATA_FIELDS), meta_fields=["meta"])


def init_factors(target: _common.Target, rank: int, seed: int):
    """(a, b): A kaiming-uniform (*stack, r, d2), B zeros (*stack, d1, r), both float32."""
    layout = target.layout
    stack = layout.stack_shape
    key = jax.random.fold_in(jax.random.key(seed), target.key_id)
    a = _common.kaiming_uniform(key, (*stack, rank, layout.d2), fan_in=layout.d2)
    b = jnp.zeros((*stack, layout.d1, rank), jnp.float32)
    return a, b


def apply(
    params,
    rank: int = 8,
    alpha: float = 16.0,
    *,
    targets: str | None = None,
    exclude: str | None = None,
    layouts: Mapping[str, Any] | None = None,
    seed: int = 0,
):
    """Replace target kernels by LoRA nodes: W = W0 + (α / r) B A.

    Args:
      params: any parameter pytree (Flax linen, NNX pure dict, HF `model.params`).
      rank: r, the rank of the update.
      alpha: α; the update is scaled by α / r (PEFT's default convention).
      targets, exclude: regexes as in `svft_jax.apply` (None: the same default targets).
      layouts: {regex: layout} for kernels whose axes cannot be inferred (see
        `svft_jax.transform.layout.NAMED_LAYOUTS`).
      seed: seeds A (combined with a checksum of each path, so targets differ).
    Returns:
      The pytree with each target leaf replaced by a `LoRANode`.
    """
    rank = _common.check_positive_int(rank, "rank")
    seed = _common.check_seed(seed)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise TypeError(f"`alpha` must be a number, got {type(alpha).__name__}.")
    nodes = {}
    for target in _common.plan_targets(params, targets, exclude, layouts):
        a, b = init_factors(target, rank, seed)
        meta = LoRAMeta(path=target.path, layout=target.layout, rank=rank, alpha=float(alpha))
        nodes[target.path] = LoRANode(a=a, b=b, base=target.kernel, meta=meta)
    return _common.replace_targets(params, nodes)
