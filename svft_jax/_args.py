"""Checks of plain option arguments shared across the library (before anything is computed)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def check_bool(value, name: str, where: str = "") -> bool:
    """`value` as a bool, refusing anything that is not one.

    `bool("false")` is True, so a string (or 0/1, None) for an on/off option would silently
    turn it on or off; only `True`, `False` and numpy bools are accepted.

    Args:
      value: the argument.
      name: the argument's name, for the message.
      where: optional prefix naming the caller or target.
    Raises:
      TypeError naming the argument.
    """
    if not isinstance(value, bool | np.bool_):
        prefix = f"{where}: " if where else ""
        raise TypeError(f"{prefix}`{name}` must be True or False, got {value!r} ({type(value).__name__}); a string such as 'false' is not a bool.")
    return bool(value)


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return int(value)


def check_seed(seed) -> int:
    """`seed` as a non-negative int (numpy's seeded Generator rejects negative seeds, but only
    after the SVDs would have run)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
    if seed < 0:
        raise ValueError(f"`seed` must be >= 0, got seed={seed}; pass a non-negative int.")
    return int(seed)


def check_finite_number(value, name: str) -> float:
    """A real, finite number (NaN/Inf would give an all-NaN model)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    if not math.isfinite(float(value)):
        raise ValueError(f"`{name}` must be finite, got {value!r}; a NaN/Inf setting makes every adapted weight NaN.")
    return float(value)


def check_float_dtype(value, name: str) -> jnp.dtype:
    """`value` as a floating JAX dtype (`factor_dtype=` and the like).

    Raises:
      TypeError: `value` is not a dtype; ValueError: it is not a floating one. Both name `name`.
    """
    try:
        dtype = jnp.dtype(value)
    except TypeError as err:
        raise TypeError(f"`{name}` must be a dtype, got {value!r}.") from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`{name}` must be a floating dtype, got {dtype}.")
    return dtype
