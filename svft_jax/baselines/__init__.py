"""Baselines in SVFT's functional API: LoRA, DoRA and VeRA.

    adapted = svft_jax.baselines.lora.apply(params, rank=8, alpha=16)
    adapted = svft_jax.baselines.dora.apply(params, rank=1)
    adapted = svft_jax.baselines.vera.apply(params, rank=256)

Each returns the params pytree with target kernels replaced by an `AdapterNode` subclass, so
`svft_jax.merge`, `split`, `combine`, `trainable_mask`, `optimizer` and `summary` work on
them unchanged. Targets are chosen by the same rules as `svft_jax.apply`.
"""

from svft_jax.baselines import dora, lora, vera
from svft_jax.baselines.dora import DoRAMeta, DoRANode
from svft_jax.baselines.lora import LoRAMeta, LoRANode
from svft_jax.baselines.vera import VeRAMeta, VeRANode

METHODS = {"lora": lora.apply, "dora": dora.apply, "vera": vera.apply}

__all__ = [
    "METHODS",
    "DoRAMeta",
    "DoRANode",
    "LoRAMeta",
    "LoRANode",
    "VeRAMeta",
    "VeRANode",
    "dora",
    "lora",
    "vera",
]
