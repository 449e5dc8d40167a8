"""The baselines' keyword spelling, in SVFT's functional API (each method lives in one file of
`svft_jax.methods`, with its typed config: `svft_jax.LoRA`, `DoRA`, `VeRA`):

    adapted = svft_jax.baselines.lora.apply(params, rank=8, alpha=16)
    adapted = svft_jax.baselines.dora.apply(params, rank=1)
    adapted = svft_jax.baselines.vera.apply(params, rank=256)

`svft_jax.merge`, `split`, `combine`, `optimizer`, `summary`, `wrap` and the adapter files work
on them unchanged; targets are chosen by the same rules as `svft_jax.apply`.
"""

from types import MappingProxyType

from svft_jax.baselines import _common, dora, lora, vera  # noqa: F401  (old submodule paths)
from svft_jax.methods.dora import DoRANode
from svft_jax.methods.lora import LoRANode
from svft_jax.methods.vera import VeRANode

#: method name -> keyword apply (read-only); the one registry of methods is `svft_jax.core.METHODS`
#: (name -> node class, whose `config_cls` is the typed config). Kept for one release.
METHODS = MappingProxyType({"lora": lora.apply, "dora": dora.apply, "vera": vera.apply})

__all__ = ["METHODS", "DoRANode", "LoRANode", "VeRANode", "dora", "lora", "vera"]
