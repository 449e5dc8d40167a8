"""Optimisers that train M (and chosen extra leaves) and leave everything else untouched."""

from __future__ import annotations

import optax

from svft_jax.transform._partition import ADAPTER, EXTRA, FROZEN, labels


def optimizer(
    tx: optax.GradientTransformation,
    adapted=None,
    *,
    extra: str | None = None,
    extra_tx: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """Wrap `tx` so that only SVFT's M (and `extra` leaves) are updated.

    Built on `optax.multi_transform`: M gets `tx`, `extra` leaves get `extra_tx` (default
    `tx`; the paper trains a new classifier head at its own learning rate), and every frozen
    leaf gets `optax.set_to_zero()` — no optimiser state and an exactly-zero update. (Bare
    `optax.masked` would pass a frozen leaf's raw gradient through as its update.)

    Args:
      tx: the optimiser for M, e.g. `optax.adamw(1e-3)`.
      adapted: unused except for symmetry with the other helpers; labels are computed from
        whatever tree `init`/`update` receive, so the full adapted tree and the trainable half
        of `split` both work.
      extra: regex of additional fully-trainable leaves (e.g. 'classifier/.*').
      extra_tx: optimiser for the `extra` leaves (default: `tx`).
    Returns:
      An `optax.GradientTransformation`.
    """
    del adapted
    transforms = {ADAPTER: tx, EXTRA: extra_tx if extra_tx is not None else tx, FROZEN: optax.set_to_zero()}
    return optax.multi_transform(transforms, lambda tree: labels(tree, extra))
