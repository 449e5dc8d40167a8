"""The pattern registry: a pattern is a function from (rank, factors, options) to static indices.

A new pattern is one function plus a call to `register_pattern`; nothing else in the library
changes. Indices are positions (row i, column j) in the r×r coefficient matrix M of

    W = W0 + U M Vᵀ,      U: (d1, r), V: (d2, r)

in the paper's orientation (W is out × in, i.e. the transpose of a Flax `Dense` kernel).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from svft_jax._registry import Registry


@dataclasses.dataclass(frozen=True)
class PatternOptions:
    """User options that a pattern may read. All hashable.

    d: band half-width (banded); also sets the default budget of random/top-k.
    k: number of positions (random, top-k); None means the banded budget for `d`.
    seed: base seed (random).
    """

    d: int | None = None
    k: int | None = None
    seed: int = 0
    #: the options a pattern has of its own, as sorted (name, value) pairs; read as attributes
    #: (`options.stride` for a typed spec `Stripes(stride=2)`).
    own: tuple = ()

    def __getattr__(self, name):
        if not name.startswith("__"):
            for key, value in object.__getattribute__(self, "own"):
                if key == name:
                    return value
        raise AttributeError(f"pattern options have no {name!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pattern:
    """A typed pattern spec — which Ω, with the options that pattern reads — as `SVFT(pattern=...)`
    takes it: `Plain()`, `Banded(d=2)`, `Random(k=64)`, `TopK(k=64)` (each defined in its
    pattern's file), or `Named(pattern=..., d=..., k=...)` for any registered name.

    A subclass sets `name` (the registered pattern) and declares the options it reads (`d`,
    `k`) as fields; `options(seed)` is what the pattern's functions receive.
    """

    name: ClassVar[str] = ""

    @property
    def pattern_name(self) -> str:
        return self.name

    def options(self, seed: int = 0) -> PatternOptions:
        """What the pattern's functions receive: d, k (when the spec has them), the seed, and
        every other field of the spec as an option of its own (so a new pattern with a new
        option is one file: its spec declares the field, its functions read `options.<field>`)."""
        own = tuple(sorted((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in ("d", "k")))
        return PatternOptions(d=getattr(self, "d", None), k=getattr(self, "k", None), seed=seed, own=own)

    @staticmethod
    def of(name: str, *, d: int | None = None, k: int | None = None) -> Pattern:
        """The spec of a registered pattern by name (checked), options as given."""
        get_pattern(name)
        return Named(pattern=name, d=d, k=k)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Named(Pattern):
    """A registered pattern by name with `d`/`k` (the keyword spelling of `apply`, and any
    pattern added with `register_pattern` that has no typed spec of its own)."""

    pattern: str
    d: int | None = None
    k: int | None = None

    @property
    def pattern_name(self) -> str:
        return self.pattern

    def options(self, seed: int = 0) -> PatternOptions:
        return PatternOptions(d=self.d, k=self.k, seed=seed)


@dataclasses.dataclass(frozen=True)
class PatternSpec:
    """A registered pattern.

    Attributes:
      name: the name users pass as `pattern=`.
      indices: `(r, u, v, options, key) -> (rows, cols)`; int32 numpy arrays of shape (n,).
        `u: (d1, r)`, `v: (d2, r)` are numpy float factors, or None when `needs_factors` is
        False. `key` is a tuple of ints that identifies the target (and layer), so seeded
        patterns differ between targets but are reproducible.
      count: `(r, options) -> n`, the number of trainable entries, computed without factors so
        that bad options are reported before any SVD runs.
      check: `(options) -> None`, raises ValueError on bad options (before any SVD runs).
      needs_factors: whether `indices` reads u and v (top-k); then each layer of a stacked
        kernel gets its own indices.
      per_layer: whether each layer of a stacked kernel gets its own indices.
      left_product: optional structured `(u, coeffs, rows, cols, options) -> U M`,
        u: (d1, r) -> (d1, r), that avoids the generic gather/segment_sum (rebuild, factored).
      coefficient_product: optional structured `(h, coeffs, rows, cols, options) -> h Mᵀ`,
        h: (..., r) -> (..., r), the r-space product of spectral execution
        y = ((x V)(Σ + M)ᵀ) Uᵀ; without one, `svft_jax.methods.svft._node` gathers h at the
        columns of Ω and segment-sums by row (T·|Ω| work either way).
    """

    name: str
    indices: Callable
    count: Callable[[int, PatternOptions], int]
    check: Callable[[PatternOptions], None]
    needs_factors: bool = False
    per_layer: bool = False
    left_product: Callable | None = None
    coefficient_product: Callable | None = None


PATTERNS: Registry[PatternSpec] = Registry("pattern", "pattern")


def register_pattern(spec: PatternSpec) -> PatternSpec:
    """Add a pattern to the registry (overwriting one of the same name is an error)."""
    return PATTERNS.register(spec.name, spec)


def get_pattern(name: str) -> PatternSpec:
    """The registered pattern called `name`; ValueError listing the known names otherwise."""
    return PATTERNS.get(name)


def available_patterns() -> tuple[str, ...]:
    """Names of all registered patterns."""
    return PATTERNS.names()


def banded_count(r: int, d: int) -> int:
    """|Ω| of a band of half-width d in an r×r grid: r(2d+1) − d(d+1), for d < r."""
    d = min(d, r - 1)
    return r * (2 * d + 1) - d * (d + 1)


def budget(r: int, options: PatternOptions) -> int:
    """k for random/top-k: the explicit `k`, else the banded budget for `d` (the paper's rule)."""
    if options.k is not None:
        return options.k
    return banded_count(r, options.d or 0)


def check_count_options(options: PatternOptions) -> None:
    """Validation shared by the count-based patterns (random, top-k)."""
    if options.k is None and options.d is None:
        raise ValueError("pattern needs `k` (number of entries) or `d` (use the banded budget).")
    if options.k is not None and options.d is not None:
        raise ValueError(f"pattern takes `k` or `d` (the banded budget), not both: got d={options.d}, k={options.k}; drop one.")
    if options.k is not None:
        if isinstance(options.k, bool) or not isinstance(options.k, int | np.integer):
            raise TypeError(f"`k` must be an int, got {type(options.k).__name__}.")
        if options.k <= 0:
            raise ValueError(f"`k` must be positive, got k={options.k}.")
    if options.d is not None:
        check_band_width(options.d)


def check_band_width(d) -> None:
    if isinstance(d, bool) or not isinstance(d, int | np.integer):
        raise TypeError(f"`d` must be an int, got {type(d).__name__}.")
    if d < 0:
        raise ValueError(f"`d` must be >= 0 (d=0 is the plain diagonal), got d={d}.")


def sort_by_column(rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order positions by (column, row) so segment sums over columns see sorted ids."""
    order = np.lexsort((rows, cols))
    return rows[order].astype(np.int32), cols[order].astype(np.int32)
