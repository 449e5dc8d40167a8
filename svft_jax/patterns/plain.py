"""SVFT^P: the diagonal of M, r trainable values (the singular values are shifted)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from svft_jax.patterns._registry import Pattern, PatternOptions, PatternSpec, register_pattern


def plain_indices(r: int, u, v, options: PatternOptions, key) -> tuple[np.ndarray, np.ndarray]:
    """Ω = {(i, i)}: rows = cols = arange(r)."""
    diagonal = np.arange(r, dtype=np.int32)
    return diagonal, diagonal.copy()


def plain_left_product(u, coeffs, rows, cols, options):
    """U diag(m): (d1, r) * (r,) -> (d1, r); no gather."""
    return u * coeffs


def plain_coefficient_product(h, coeffs, rows, cols, options):
    """h diag(m)ᵀ = h * m: (..., r) * (r,) -> (..., r); no gather."""
    return h * coeffs


def _check(options: PatternOptions) -> None:
    if options.d is not None or options.k is not None:
        raise ValueError(f"pattern='plain' (the diagonal) takes no `d` or `k`, got d={options.d}, k={options.k}; use pattern='banded' for d, 'random'/'topk' for k.")


PLAIN = register_pattern(
    PatternSpec(
        name="plain",
        indices=plain_indices,
        count=lambda r, options: r,
        check=_check,
        left_product=plain_left_product,
        coefficient_product=plain_coefficient_product,
    )
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plain(Pattern):
    """SVFT^P: the diagonal of M (|Ω| = r); no options."""

    name: ClassVar[str] = "plain"
