"""Sparsity patterns Ω over the r×r coefficient matrix M. One file per pattern: its index
function, its structured products, and its typed spec (`Plain()`, `Banded(d=2)`, `Random(k=..)`,
`TopK(k=..)`), registered with `register_pattern`."""

from svft_jax.patterns import banded, plain, random, topk  # noqa: F401  (registers them)
from svft_jax.patterns._registry import (
    Named,
    Pattern,
    PatternOptions,
    PatternSpec,
    available_patterns,
    banded_count,
    budget,
    get_pattern,
    register_pattern,
)
from svft_jax.patterns.banded import Banded, band_coefficients, band_offsets
from svft_jax.patterns.plain import Plain
from svft_jax.patterns.random import Random
from svft_jax.patterns.topk import TopK, alignment_scores

__all__ = [
    "Banded",
    "Named",
    "Pattern",
    "PatternOptions",
    "PatternSpec",
    "Plain",
    "Random",
    "TopK",
    "alignment_scores",
    "available_patterns",
    "band_coefficients",
    "band_offsets",
    "banded_count",
    "budget",
    "get_pattern",
    "register_pattern",
]
