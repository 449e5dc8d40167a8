"""What the baselines share: target planning with the core's rules, argument checks, seeded
draws. Every baseline picks targets with `select_targets` and reads kernels through the core's
`KernelLayout`, so a GPT-2 `(out, in)` kernel, a `DenseGeneral` kernel or a stacked `nn.scan`
kernel is adapted exactly as SVFT adapts it. Matrices use the paper's orientation
W: (*stack, d1 = out, d2 = in)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from svft_jax.core._adapt import build, plan_adapt
from svft_jax.core._rules import keyword_rules

_HIGHEST = jax.lax.Precision.HIGHEST


from svft_jax._args import check_finite_number, check_positive_int, check_seed  # noqa: E402, F401  (one home)


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



def keyword_apply(params, config, *, targets, exclude, layouts, extra):
    """A baseline's keyword `apply`: its config and `layouts` as rules, through the core's verb."""
    planned = plan_adapt(params, keyword_rules(config, layouts), targets=targets, exclude=exclude, extra=extra)
    return build(params, planned, extra=extra)
