"""Sparsity patterns Ω over the r×r coefficient matrix M. One file per pattern."""

from svft_jax.patterns import banded, plain, random, topk  # noqa: F401  (registers them)
from svft_jax.patterns._registry import (
    PatternOptions,
    PatternSpec,
    available_patterns,
    banded_count,
    budget,
    get_pattern,
    register_pattern,
)
from svft_jax.patterns.banded import band_coefficients, band_offsets
from svft_jax.patterns.topk import alignment_scores

__all__ = [
    "PatternOptions",
    "PatternSpec",
    "alignment_scores",
    "available_patterns",
    "band_coefficients",
    "band_offsets",
    "banded_count",
    "budget",
    "get_pattern",
    "register_pattern",
]
