"""Optimisers that train M (and chosen extra leaves) and leave everything else untouched."""

from __future__ import annotations

import warnings

import jax
import optax

from svft_jax._paths import path_to_str
from svft_jax.core._partition import ADAPTER, EXTRA, FROZEN, labels
from svft_jax.core._protocol import is_node, is_special

_UNSET = object()  # tells a passed `adapted` (even None) from none


def optimizer(
    tx: optax.GradientTransformation,
    adapted=_UNSET,
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
      adapted: deprecated and unused (a DeprecationWarning for one release): labels are
        computed from whatever tree `init`/`update` receive, so the full adapted tree and the
        trainable half of `split` both work.
      extra: regex of additional fully-trainable leaves (e.g. 'classifier/.*').
      extra_tx: optimiser for the `extra` leaves (default: `tx`).
    Returns:
      An `optax.GradientTransformation`.
    Raises (at `init`/`update`):
      ValueError when, without `extra`, the tree is the trainable half of `split` and holds
      leaves that are neither adapter arrays nor `Trainable`-marked (`split(adapted, extra=regex)`
      on an unmarked tree puts them there): they would get exactly-zero updates.
    """
    if adapted is not _UNSET:
        warnings.warn("svft_jax.optimizer(tx, adapted): the second argument is unused (the trainable set is read from the "
                      "tree that init/update receive) and will be removed; call svft_jax.optimizer(tx).",
                      DeprecationWarning, stacklevel=2)
    transforms = {ADAPTER: tx, EXTRA: extra_tx if extra_tx is not None else tx, FROZEN: optax.set_to_zero()}
    return optax.multi_transform(transforms, lambda tree: _checked_labels(tree, extra))


def _checked_labels(tree, extra: str | None):
    """`labels(tree, extra)`, refusing a trainable half whose plain leaves would be frozen.

    `split(adapted, extra=regex)` on a tree without `Trainable` markers puts the regex's leaves
    in the trainable half unmarked; an optimiser built without the same `extra` would label
    them frozen and give them an exactly-zero update, so the head would silently never train.
    """
    tags = labels(tree, extra)
    if extra is None and _is_trainable_half(tree):
        frozen = [path_to_str(p) for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_special)[0]
                  if not is_special(x)]
        if frozen:
            raise ValueError(
                f"optimizer: {frozen[0]!r} (and {len(frozen) - 1} more) is in the trainable half of svft_jax.split "
                f"but carries no Trainable marker, and this optimizer was built without `extra`, so its update "
                f"would be exactly zero: it would silently never train. Build the optimizer with the regex "
                f"split got (svft_jax.optimizer(tx, extra=...)), or declare it once with apply(..., extra=...) "
                f"or svft_jax.mark_trainable.")
    return tags


def _is_trainable_half(tree) -> bool:
    """True for the trainable half of `split` (or its gradients): adapter nodes whose frozen
    arrays are all None while some trainable array is present."""
    nodes = [x for x in jax.tree_util.tree_leaves(tree, is_leaf=is_special) if is_node(x)]
    for node in nodes:
        trainable = node.trainable_fields()
        frozen = [getattr(node, f) for f in node.data_fields() if f not in trainable]
        if frozen and all(x is None for x in frozen) and any(getattr(node, f) is not None for f in trainable):
            return True
    return False
