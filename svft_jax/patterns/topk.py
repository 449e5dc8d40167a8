"""SVFT^T: the k pairs (i, j) with the largest alignment |u_iᵀ v_j|.

For a square weight (d1 = d2) this is exactly the paper's rule. For a non-square weight
u_i ∈ R^{d1} and v_j ∈ R^{d2} live in different spaces, so we define the alignment over
the n = min(d1, d2) leading coordinates: |u_i[:n]ᵀ v_j[:n]|. (The authors' code scores a
non-square weight by the square factor's own entries instead; both are heuristics, ours
keeps the paper's formula and reduces to it when d1 = d2.) Ties are broken by the smaller
flat index i·r + j, so the pattern is deterministic. Factors are sign-canonicalised before
scoring, and |·| makes the score sign-invariant anyway.
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


def alignment_scores(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """|u_iᵀ v_j| over the shared leading coordinates: (r, r) float64."""
    n = min(u.shape[0], v.shape[0])
    u = np.asarray(u[:n], dtype=np.float64)
    v = np.asarray(v[:n], dtype=np.float64)
    return np.abs(u.T @ v)


def topk_indices(r: int, u, v, options: PatternOptions, key) -> tuple[np.ndarray, np.ndarray]:
    """The k largest alignment scores, as (rows, cols) sorted by (col, row)."""
    k = budget(r, options)
    scores = alignment_scores(u, v).ravel()
    order = np.lexsort((np.arange(scores.size), -scores))  # descending score, then flat index
    flat = order[:k]
    return sort_by_column(flat // r, flat % r)


TOPK = register_pattern(
    PatternSpec(
        name="topk",
        indices=topk_indices,
        count=budget,
        check=check_count_options,
        needs_factors=True,
        per_layer=True,
    )
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopK(Pattern):
    """SVFT^T: the k positions of largest alignment |u_iᵀ v_j| (k=None: the budget of the d-band)."""

    name: ClassVar[str] = "topk"
    k: int | None = None
    d: int | None = None
