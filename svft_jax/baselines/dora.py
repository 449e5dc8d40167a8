"""DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024).

W = m ⊙ V / ‖V‖,  V = W0 + (α / r) B A,

with the magnitude m trainable and initialised to ‖W0‖, and the direction updated by LoRA.

Norm axis. The paper writes ‖·‖_c, "the vector-wise norm of a matrix across each column",
for W ∈ R^{d×k} in its own (in × out) orientation, i.e. one norm per output unit. PEFT (the
reference code) computes, for a PyTorch Linear weight (out, in), `weight.norm(p=2, dim=1)`:
the norm over the input dimension for each output unit. Both mean the same thing; here, in
the paper-of-SVFT orientation W: (d1 = out, d2 = in), it is the norm of each *row* of W
(over d2), and m has shape (*stack, d1).

Gradient through the norm. Following §4.3 of the DoRA paper and PEFT, ‖V‖ is treated as a
constant in the backward pass (`jax.lax.stop_gradient`) by default; the forward value is the
same either way. Pass `detach_norm=False` for the exact gradient of the formula.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from svft_jax.baselines import _common
from svft_jax.baselines.lora import init_factors
from svft_jax.transform.layout import KernelLayout
from svft_jax.transform.node import AdapterNode


@dataclasses.dataclass(frozen=True)
class DoRAMeta:
    """Static description of one DoRA target (see `LoRAMeta`), plus `detach_norm`."""

    path: str
    layout: KernelLayout
    rank: int
    alpha: float
    detach_norm: bool

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class DoRANode(AdapterNode):
    """One DoRA-adapted kernel.

    Children:
      magnitude: (*stack, d1) trainable, float32; ‖W0‖ per output unit at init.
      a:         (*stack, r, d2) trainable. b: (*stack, d1, r) trainable (zeros at init).
      base:      the frozen kernel W0 in its own layout and dtype.
    """

    DATA_FIELDS = ("magnitude", "a", "b", "base")
    TRAINABLE_FIELDS = ("magnitude", "a", "b")

    magnitude: Any
    a: Any
    b: Any
    base: Any
    meta: DoRAMeta

    def weight_matrix(self):
        """The adapted W, float32: (*stack, d1, d2)."""
        layout = self.meta.layout
        direction = layout.to_matrix(jnp.asarray(self.base, jnp.float32))
        direction = direction + self.meta.scaling * _common.low_rank_product(self.b, self.a)
        norm = row_norms(direction)
        if self.meta.detach_norm:
            norm = jax.lax.stop_gradient(norm)
        return direction * (jnp.asarray(self.magnitude, jnp.float32) / norm)[..., None]

    def merged_kernel(self):
        layout = self.meta.layout
        return layout.from_matrix(self.weight_matrix()).astype(layout.dtype)

    @property
    def num_trainable(self) -> int:
        layout = self.meta.layout
        return _common.layers(layout) * (self.meta.rank * (layout.d1 + layout.d2) + layout.d1)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return self.meta.layout.shape

    def summary_row(self) -> tuple[str, ...]:
        layout = self.meta.layout
        entries = self.meta.rank * (layout.d1 + layout.d2) + layout.d1
        return (self.meta.path, _common.shape_text(layout), f"dora(α={self.meta.alpha:g})",
                str(self.meta.rank), str(entries))


jax.tree_util.register_dataclass(DoRANode, data_fields=list(DoRANode.DATA_FIELDS), meta_fields=["meta"])


def row_norms(matrix):
    """‖W_i,:‖₂ for each output unit i: (*stack, d1, d2) -> (*stack, d1)."""
    return jnp.sqrt(jnp.sum(jnp.square(matrix), axis=-1))


def apply(
    params,
    rank: int = 1,
    alpha: float | None = None,
    *,
    targets: str | None = None,
    exclude: str | None = None,
    layouts: Mapping[str, Any] | None = None,
    seed: int = 0,
    detach_norm: bool = True,
):
    """Replace target kernels by DoRA nodes: W = m ⊙ (W0 + (α/r) B A) / ‖W0 + (α/r) B A‖.

    Args:
      params: any parameter pytree.
      rank: r of the LoRA direction update.
      alpha: α (default 2r, PEFT's common choice of α/r = 2).
      targets, exclude, layouts, seed: as in `svft_jax.baselines.lora.apply`.
      detach_norm: treat the norm as a constant in the backward pass (DoRA §4.3, PEFT).
    Returns:
      The pytree with each target leaf replaced by a `DoRANode`.
    Raises:
      ValueError if a target has an all-zero output row (its direction is undefined).
    """
    rank = _common.check_positive_int(rank, "rank")
    seed = _common.check_seed(seed)
    alpha = 2.0 * rank if alpha is None else alpha
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise TypeError(f"`alpha` must be a number, got {type(alpha).__name__}.")
    nodes = {}
    for target in _common.plan_targets(params, targets, exclude, layouts):
        w0 = target.layout.to_matrix(jnp.asarray(target.kernel, jnp.float32))
        magnitude = row_norms(w0)
        if not bool(jnp.all(magnitude > 0)):
            raise ValueError(f"parameter {target.path!r} has an output unit whose weights are all zero; DoRA's direction W/‖W‖ is undefined there. Exclude it with `exclude`.")
        a, b = init_factors(target, rank, seed)
        meta = DoRAMeta(path=target.path, layout=target.layout, rank=rank, alpha=float(alpha),
                        detach_norm=bool(detach_norm))
        nodes[target.path] = DoRANode(magnitude=magnitude, a=a, b=b, base=target.kernel, meta=meta)
    return _common.replace_targets(params, nodes)
