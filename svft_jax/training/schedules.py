"""Learning-rate schedules used by the paper: linear warmup, then linear or cosine decay.

SVFT (arXiv:2405.19597, App. C) fine-tunes with a warmup ratio and a linear schedule for the
language tasks (the Hugging Face `get_linear_schedule_with_warmup`) and cosine decay for the
vision tasks. Both are thin wrappers over optax schedules with argument checks.
"""

from __future__ import annotations

import math
import numbers

import optax


def _check_rate(name: str, value) -> None:
    """A learning rate must be a finite real ≥ 0 (a NaN or inf one trains an all-NaN model)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "dtype") and value.dtype.kind in "iuf":
        value = float(value)  # a numpy / concrete jax scalar
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}.")


def _check(peak_lr, total_steps: int, warmup_steps: int, end_lr=0.0) -> None:
    if (
        isinstance(total_steps, bool)
        or not isinstance(total_steps, numbers.Integral)
        or total_steps < 1
    ):
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}.")
    if (
        isinstance(warmup_steps, bool)
        or not isinstance(warmup_steps, numbers.Integral)
        or not 0 <= warmup_steps <= total_steps
    ):
        raise ValueError(
            f"warmup_steps must be an int in [0, total_steps={total_steps}], got {warmup_steps!r}."
        )
    _check_rate("peak_lr", peak_lr)
    _check_rate("end_lr", end_lr)


def warmup_linear(
    peak_lr: float, total_steps: int, warmup_steps: int = 0, end_lr: float = 0.0
) -> optax.Schedule:
    """0 → peak_lr linearly over `warmup_steps`, then peak_lr → end_lr linearly until `total_steps`.

    lr(t) = peak · t / warmup                              for t < warmup
          = peak + (end − peak) · (t − warmup) / (total − warmup)   for warmup ≤ t ≤ total
    and end_lr afterwards (t is the 0-based optimiser step count).

    Args:
      peak_lr: learning rate reached at the end of warmup.
      total_steps: optimiser steps of the whole run (warmup included).
      warmup_steps: steps of linear warmup (0: start at peak_lr).
      end_lr: final learning rate.
    Returns:
      An optax schedule (step -> lr).
    """
    _check(peak_lr, total_steps, warmup_steps, end_lr)
    total_steps, warmup_steps = int(total_steps), int(warmup_steps)
    decay = optax.linear_schedule(peak_lr, end_lr, max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def warmup_cosine(
    peak_lr: float, total_steps: int, warmup_steps: int = 0, end_lr: float = 0.0
) -> optax.Schedule:
    """0 → peak_lr linearly over `warmup_steps`, then half a cosine down to end_lr at `total_steps`.

    lr(t) = end + (peak − end) · ½ (1 + cos(π (t − warmup) / (total − warmup)))  for t ≥ warmup.

    Args and Returns: as `warmup_linear`.
    """
    _check(peak_lr, total_steps, warmup_steps, end_lr)
    total_steps, warmup_steps = int(total_steps), int(warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=end_lr,
    )


def warmup_constant(peak_lr: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """0 → peak_lr linearly over `warmup_steps`, then constant."""
    _check(peak_lr, total_steps, warmup_steps)
    warmup_steps = int(warmup_steps)
    if warmup_steps == 0:
        return optax.constant_schedule(peak_lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak_lr, warmup_steps), optax.constant_schedule(peak_lr)],
        [warmup_steps],
    )


SCHEDULES = {"linear": warmup_linear, "cosine": warmup_cosine, "constant": warmup_constant}


def make_schedule(
    name: str, peak_lr: float, total_steps: int, warmup_steps: int = 0
) -> optax.Schedule:
    """A schedule by name: "linear", "cosine" or "constant" (all with linear warmup)."""
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}.")
    return SCHEDULES[name](peak_lr, total_steps, warmup_steps)
