"""A new SVFT pattern with an option of its own, in one file: every `stride`-th diagonal entry
of M, Ω = {(i, i): i = 0, stride, 2·stride, ...}. Its typed spec declares the option; its
functions read it as `options.stride`. Used by tests/test_pattern_one_file.py."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

import svft_jax
from svft_jax.patterns import Pattern, PatternSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stripes(Pattern):
    name: ClassVar[str] = "example_stripes"
    stride: int = 2


def _indices(r, u, v, options, key):
    diagonal = np.arange(0, r, options.stride, dtype=np.int32)
    return diagonal, diagonal.copy()


def _check(options):
    if not isinstance(options.stride, int) or options.stride < 1:
        raise ValueError(f"Stripes(stride=...) must be a positive int, got {options.stride!r}.")


SPEC = PatternSpec(name="example_stripes", indices=_indices, count=lambda r, options: -(-r // options.stride), check=_check)
svft_jax.patterns.register_pattern(SPEC)
