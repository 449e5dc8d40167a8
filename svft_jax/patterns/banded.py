"""SVFT^B: the diagonal and `d` off-diagonals on each side of M (|i − j| ≤ d).

Entries are stored offset by offset (−d … d), each offset's entries in column order, so the
products U M (rebuild, factored) and h Mᵀ (spectral, on r-dimensional activations) are sums of
2d+1 shifted, scaled slices of one zero-padded array: static slices, no gather, no scatter.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax.patterns._registry import (
    Pattern,
    PatternOptions,
    PatternSpec,
    banded_count,
    check_band_width,
    register_pattern,
)


def band_offsets(r: int, d: int) -> list[tuple[int, int, int]]:
    """(offset o = i − j, start in m, length r − |o|) for o = −d … d, with d clamped to r − 1."""
    d = min(d, r - 1)
    layout, start = [], 0
    for offset in range(-d, d + 1):
        length = r - abs(offset)
        layout.append((offset, start, length))
        start += length
    return layout


def banded_indices(r: int, u, v, options: PatternOptions, key) -> tuple[np.ndarray, np.ndarray]:
    """Ω = {(i, j): |i − j| ≤ d}, ordered by offset i − j, then by column j."""
    rows, cols = [], []
    for offset, _, length in band_offsets(r, options.d):
        column = np.arange(max(0, -offset), max(0, -offset) + length)
        rows.append(column + offset)
        cols.append(column)
    return np.concatenate(rows).astype(np.int32), np.concatenate(cols).astype(np.int32)


def band_coefficients(coeffs, r: int, d: int):
    """The band as a dense (2d+1, r) array: row o+d holds M[j+o, j] at column j (0 elsewhere)."""
    bands = []
    for offset, start, length in band_offsets(r, d):
        values = coeffs[..., start : start + length]
        lead = max(0, -offset)
        pad = [(0, 0)] * (values.ndim - 1) + [(lead, r - length - lead)]
        bands.append(jnp.pad(values, pad))
    return jnp.stack(bands, axis=-2)


def band_row_coefficients(coeffs, r: int, d: int):
    """The band indexed by row: a dense (2d+1, r) array whose row o+d holds M[i, i−o] at column
    i (0 where i − o is outside [0, r)). The layout that h Mᵀ reads: (h Mᵀ)_i = Σ_o M[i, i−o] h_{i−o}."""
    bands = []
    for offset, start, length in band_offsets(r, d):
        values = coeffs[..., start : start + length]
        lead = max(0, offset)  # offset o stores i = j + o for j in column order, so i starts at max(0, o)
        pad = [(0, 0)] * (values.ndim - 1) + [(lead, r - length - lead)]
        bands.append(jnp.pad(values, pad))
    return jnp.stack(bands, axis=-2)


def _shift(x, shift: int, d: int):
    """x[..., i + shift] with x zero outside [0, r) (|shift| ≤ d): a static slice of a padded copy."""
    r = x.shape[-1]
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(d, d)])
    return padded[..., d + shift : d + shift + r]


def _shifted_sum_of(x, bands, shifts, d):
    r = x.shape[-1]
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(d, d)])
    total = None
    for band, shift in zip(bands, shifts, strict=True):
        term = band * padded[..., d + shift : d + shift + r]
        total = term if total is None else total + term
    return total


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _shifted_sum(x, bands, shifts, d):
    """Σ_o bands[o] · x[..., i + shifts[o]] with x zero outside [0, r): (..., r).

    One zero-padded copy of x and 2d+1 static slices of it, multiplied and summed: XLA fuses
    them into one elementwise loop (and the gradient into one more), where a chain of
    `.at[].add` updates would write the (..., r) buffer 2d+1 times.

    The derivative rule (`_shifted_sum_jvp`) keeps the backward pass from saving the 2d
    shifted copies of x: with autodiff's own rule, the gradient of each band reads its shifted
    slice of x, and XLA keeps those slices from the forward pass — 2d extra (..., r) buffers
    per adapted kernel alive until the backward pass (on SmolLM2 with SVFT^B d=2 on all 210
    kernels, batch 8 × 64: 4 × 3,264 floats per token per layer, the step's XLA scratch
    1,866 → 1,014 MiB). The rule's tangent reads x unshifted, so its transpose shifts the incoming
    gradient instead and only x itself is kept.
    """
    return _shifted_sum_of(x, bands, shifts, d)


def _shifted_sum_jvp(shifts, d, primals, tangents):
    x, bands = primals
    x_dot, bands_dot = tangents
    out = _shifted_sum_of(x, bands, shifts, d)
    parts = []
    if not _is_zero(x_dot):
        parts.append(_shifted_sum_of(x_dot, bands, shifts, d))
    # Σ_o band_dot[o]_i x_{i+s} = Σ_o shift_s(shift_{−s}(band_dot[o]) ⊙ x)_i: x enters unshifted.
    parts += [_shift(_shift(band_dot, -shift, d) * x, shift, d)
              for band_dot, shift in zip(bands_dot, shifts, strict=True) if not _is_zero(band_dot)]
    if not parts:
        return out, jnp.zeros_like(out)
    return out, sum(parts[1:], parts[0])


def _is_zero(tangent) -> bool:
    return isinstance(tangent, jax.custom_derivatives.SymbolicZero)


_shifted_sum.defjvp(_shifted_sum_jvp, symbolic_zeros=True)


def banded_left_product(u, coeffs, rows, cols, options):
    """U M for a band: column j of U M is Σ_o M[j+o, j] u_{j+o}. u: (d1, r), coeffs: (|Ω|,).

    Returns (d1, r) in the promoted dtype of u and coeffs. Costs d1·|Ω| multiply-adds.
    """
    r = u.shape[-1]
    d = min(options.d, r - 1)
    bands = band_coefficients(coeffs, r, d)  # (2d+1, r), column-indexed
    return _shifted_sum(u, [bands[o + d] for o in range(-d, d + 1)], tuple(range(-d, d + 1)), d)


def banded_coefficient_product(h, coeffs, rows, cols, options):
    """h Mᵀ for a band: (h Mᵀ)_i = Σ_o M[i, i−o] h_{i−o}. h: (..., r), coeffs: (|Ω|,).

    Returns (..., r) in the promoted dtype; T·|Ω| multiply-adds for T rows of h, and its
    gradient w.r.t. the coefficients is T·|Ω| more (read off the two r-dimensional
    activations, never an r×r matrix).
    """
    r = h.shape[-1]
    d = min(options.d, r - 1)
    bands = band_row_coefficients(coeffs, r, d)  # (2d+1, r), row-indexed
    return _shifted_sum(h, [bands[o + d] for o in range(-d, d + 1)], tuple(-o for o in range(-d, d + 1)), d)


def _check(options: PatternOptions) -> None:
    if options.d is None:
        raise ValueError("pattern='banded' needs the band half-width `d` (d=0 is plain).")
    check_band_width(options.d)
    if options.k is not None:
        raise ValueError("pattern='banded' takes `d`, not `k`; its size is r(2d+1) − d(d+1).")


BANDED = register_pattern(
    PatternSpec(
        name="banded",
        indices=banded_indices,
        count=lambda r, options: banded_count(r, options.d),
        check=_check,
        left_product=banded_left_product,
        coefficient_product=banded_coefficient_product,
    )
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Banded(Pattern):
    """SVFT^B: |i − j| ≤ d (the diagonal and d off-diagonals on each side of M).

    d=None (`Banded()`) only with `SVFT(budget=N)`, which then chooses d; `SVFT` refuses it
    otherwise."""

    name: ClassVar[str] = "banded"
    d: int | None = None
