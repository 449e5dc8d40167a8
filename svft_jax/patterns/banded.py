"""SVFT^B: the diagonal and `d` off-diagonals on each side of M (|i − j| ≤ d).

Entries are stored offset by offset (−d … d), each offset's entries in column order, so the
product U M is a sum of 2d+1 shifted, scaled copies of U's columns: static slices, no gather.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from svft_jax.patterns._registry import (
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


def banded_left_product(u, coeffs, rows, cols, options):
    """U M for a band: column j of U M is Σ_o M[j+o, j] u_{j+o}. u: (d1, r), coeffs: (|Ω|,)."""
    r = u.shape[-1]
    out = jnp.zeros_like(u, dtype=jnp.result_type(u, coeffs))
    for offset, start, length in band_offsets(r, options.d):
        values = coeffs[start : start + length]
        if offset >= 0:  # i = j + o, j in [0, r − o)
            out = out.at[:, :length].add(u[:, offset:] * values)
        else:  # j in [−o, r), i = j + o in [0, r + o)
            out = out.at[:, -offset:].add(u[:, :length] * values)
    return out


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
    )
)
