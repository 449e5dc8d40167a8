"""Baselines in SVFT's functional API, each one adapter-protocol method in one file:

    adapted = svft_jax.methods.lora.apply(params, rank=8, alpha=16)
    adapted = svft_jax.methods.dora.apply(params, rank=1)
    adapted = svft_jax.methods.vera.apply(params, rank=256)

`svft_jax.merge`, `split`, `combine`, `optimizer`, `summary`, `wrap` and the adapter files work
on them unchanged; targets are chosen by the same rules as `svft_jax.apply`.
"""

from types import MappingProxyType

from svft_jax.baselines import _common, dora, lora, vera  # noqa: F401  (old submodule paths)
from svft_jax.methods.dora import DoRANode
from svft_jax.methods.lora import LoRANode
from svft_jax.methods.vera import VeRANode

#: method name -> apply function (read-only).
METHODS = MappingProxyType({"lora": lora.apply, "dora": dora.apply, "vera": vera.apply})

__all__ = ["METHODS", "DoRANode", "LoRANode", "VeRANode", "dora", "lora", "vera"]
