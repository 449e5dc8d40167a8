"""SVFT^R: k distinct positions of M drawn uniformly without replacement.

Draws use numpy's `Generator` (PCG64) seeded with (seed, crc32(parameter path), layer), so
the pattern is identical on every platform and differs between targets and layers. The
diagonal is *not* forced in (the paper's random pattern is uniform); use `banded` with
small `d` when the singular values themselves must be trainable.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from svft_jax.patterns._registry import (
    Pattern,
    PatternOptions,
    PatternSpec,
    budget,
    check_count_options,
    register_pattern,
    sort_by_column,
)


def random_indices(r: int, u, v, options: PatternOptions, key) -> tuple[np.ndarray, np.ndarray]:
    """k distinct (row, col) pairs from the r×r grid, sorted by (col, row)."""
    k = budget(r, options)
    generator = np.random.default_rng([options.seed, *key])
    flat = generator.choice(r * r, size=k, replace=False)
    return sort_by_column(flat // r, flat % r)


RANDOM = register_pattern(
    PatternSpec(
        name="random",
        indices=random_indices,
        count=budget,
        check=check_count_options,
        per_layer=True,
    )
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Random(Pattern):
    """SVFT^R: k seeded random positions of M (k=None: the budget of the d-band); the seed is
    `SVFT(seed=...)`, folded with each target's path."""

    name: ClassVar[str] = "random"
    k: int | None = None
    d: int | None = None
