"""What the baselines share: target planning with the core's rules, argument checks, seeded
draws. Every baseline picks targets with `select_targets` and reads kernels through the core's
`KernelLayout`, so a GPT-2 `(out, in)` kernel, a `DenseGeneral` kernel or a stacked `nn.scan`
kernel is adapted exactly as SVFT adapts it. Matrices use the paper's orientation
W: (*stack, d1 = out, d2 = in)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax.core._targets import (  # noqa: F401  (the baselines' verbs)
    apply_method,
    build_planned,
    plan_method,
    plan_targets,
)

_HIGHEST = jax.lax.Precision.HIGHEST


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return int(value)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
    if seed < 0:
        raise ValueError(f"`seed` must be >= 0, got seed={seed}.")
    return int(seed)


def check_finite_number(value, name: str) -> float:
    """A real, finite number (NaN/Inf would give an all-NaN model)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    if not math.isfinite(float(value)):
        raise ValueError(f"`{name}` must be finite, got {value!r}; a NaN/Inf setting makes every adapted weight NaN.")
    return float(value)


def kaiming_uniform(key, shape, fan_in: int, gain: float = 1.0 / math.sqrt(3.0)):
    """U(−b, b) with b = gain·√(3 / fan_in).

    gain = 1/√3 is PyTorch's `nn.Linear` default (kaiming_uniform with a=√5, so b = 1/√fan_in),
    which PEFT uses for LoRA's A; gain = √2 (a=0) is PEFT's VeRA init, b = √(6/fan_in).
    """
    bound = gain * math.sqrt(3.0 / fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def low_rank_product(b, a):
    """B A for (*stack, d1, r) × (*stack, r, d2) in float32 at full precision."""
    return jnp.matmul(jnp.asarray(b, jnp.float32), jnp.asarray(a, jnp.float32), precision=_HIGHEST)



def register(*, method: str, make_plans, arrays, describe) -> None:
    """Register a baseline's planner, so `svft_jax.plan(params, method=...)` reads the same
    plans as its `apply` (update rank = the plan's rank; W0 always applied)."""
    from svft_jax.core._size import Planner, register_planner

    register_planner(Planner(method=method, make_plans=make_plans, arrays=arrays,
                             update_rank=lambda plan: plan.rank, describe=describe))
