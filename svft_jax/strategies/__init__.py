"""Execution strategies: run a model on adapter nodes without a naive merge.

    loss = lambda p, x: loss_of(svft_jax.wrap(model.apply)(p, x))           # auto per target
    logits = svft_jax.wrap(hf_model, params_argname="params")(ids, params=adapted).logits
    fast = svft_jax.wrap(model.apply, "factored", overrides={".*head.*": "rebuild"})

Strategies: "rebuild", "rebuild_remat", "factored", "spectral", "auto", "reference"; the cost
model behind "auto" is `step_flops`/`choose_strategy`; `drop_unused_base` frees W0 where no
strategy `auto` can choose reads it. A strategy is `fn(node, use: KernelUse) -> y`
added with `register_strategy`.
"""

from svft_jax.core._cost import choose_strategy, step_flops
from svft_jax.strategies._wrap import Wrapped, wrap
from svft_jax.strategies.interpreter import (
    FallbackError,
    FallbackWarning,
    KernelUse,
    register_layer_slicer,
    slice_layer,
)
from svft_jax.strategies.registry import (
    StrategyFallbackWarning,
    available_strategies,
    drop_unused_base,
    get_strategy,
    register_strategy,
)

__all__ = [
    "FallbackError",
    "FallbackWarning",
    "KernelUse",
    "StrategyFallbackWarning",
    "Wrapped",
    "available_strategies",
    "choose_strategy",
    "drop_unused_base",
    "get_strategy",
    "register_layer_slicer",
    "register_strategy",
    "slice_layer",
    "step_flops",
    "wrap",
]
