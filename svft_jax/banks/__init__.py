"""SVFT adapter banks: many SVFT adapters over one base's shared factors — hot-swap,
per-example routing, arithmetic. The implementation lives in SVFT's folder
(`svft_jax/methods/svft/banks/`), as it is SVFT-only; see its docstring for the walk-through.

Importing this module registers the "routed" strategy of `svft_jax.wrap`.
"""

from svft_jax.methods.svft.banks import *  # noqa: F403
from svft_jax.methods.svft.banks import __all__ as __all__
