"""Execution strategies: run a model on SVFT (or baseline) nodes without a naive merge.

    loss = lambda p, x: loss_of(svft_jax.wrap(model.apply)(p, x))           # auto per target
    logits = svft_jax.wrap(hf_model, params_argname="params")(ids, params=adapted).logits
    fast = svft_jax.wrap(model.apply, "factored", overrides={".*head.*": "rebuild"})

Strategies: "rebuild", "rebuild_remat", "factored", "auto", "reference"; the cost model
behind "auto" is `step_flops`/`choose_strategy`.
"""

from svft_jax.strategies.cost import choose_strategy, step_flops
from svft_jax.strategies.factored import factored_for, register_factored, svft_matmul
from svft_jax.strategies.interpreter import KernelProxy, KernelUse
from svft_jax.strategies.registry import (
    available_strategies,
    get_strategy,
    reference_kernel,
    register_strategy,
)
from svft_jax.strategies.wrap import wrap

__all__ = [
    "KernelProxy",
    "KernelUse",
    "available_strategies",
    "choose_strategy",
    "factored_for",
    "get_strategy",
    "reference_kernel",
    "register_factored",
    "register_strategy",
    "step_flops",
    "svft_matmul",
    "wrap",
]
