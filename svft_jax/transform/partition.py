"""Which leaves train: masks, labels, and equinox-style split/combine.

Trainable leaves are each adapter node's TRAINABLE_FIELDS (SVFT: M and the reference gate;
LoRA: A and B; ...), plus any leaf whose
path matches the `extra` regex (for example a new classifier head). Everything else — U, s,
V, W0 and every untouched parameter — is frozen.
"""

from __future__ import annotations

import dataclasses

import jax

from svft_jax._paths import compile_regex, map_with_path, matches, path_to_str
from svft_jax.transform.node import AdapterNode, is_node

FROZEN, ADAPTER, EXTRA = "frozen", "adapter", "extra"


def _node_labels(node: AdapterNode) -> AdapterNode:
    """The node with each array field replaced by its label (None stays None)."""
    return dataclasses.replace(
        node,
        **{
            field: None if getattr(node, field) is None else (ADAPTER if field in node.TRAINABLE_FIELDS else FROZEN)
            for field in node.DATA_FIELDS
        },
    )


def labels(tree, extra: str | None = None):
    """A pytree of strings: "adapter" on adapter parameters (SVFT: M and gates), "extra" on `extra` leaves, else "frozen".

    Works on the full adapted tree and on either half of `split` (None positions stay None),
    so it can serve as `optax.multi_transform`'s `param_labels`.
    """
    extra_re = compile_regex(extra, "extra")

    def label(path, x):
        if is_node(x):
            return _node_labels(x)
        return EXTRA if matches(extra_re, path) else FROZEN

    return map_with_path(label, tree, is_leaf=is_node)


def trainable_mask(adapted, extra: str | None = None):
    """Bool pytree with the structure of `adapted`: True on M, gates and `extra` leaves.

    Usable as `optax.masked(tx, trainable_mask(adapted))`; note that bare `optax.masked`
    passes frozen leaves' updates through unchanged — prefer `svft_jax.optimizer`, which
    zeroes them.
    """
    return jax.tree_util.tree_map(lambda label: label != FROZEN, labels(adapted, extra))


def split(adapted, extra: str | None = None):
    """(trainable, frozen): two trees shaped like `adapted`, with None where the other holds.

    `jax.grad(loss)(trainable, frozen, ...)` then differentiates M (and `extra`) alone.
    """
    mask = trainable_mask(adapted, extra)
    trainable = jax.tree_util.tree_map(lambda x, keep: x if keep else None, adapted, mask)
    frozen = jax.tree_util.tree_map(lambda x, keep: None if keep else x, adapted, mask)
    return trainable, frozen


def _structure(tree):
    return jax.tree_util.tree_structure(tree, is_leaf=lambda x: x is None)


def combine(trainable, frozen):
    """The inverse of `split`: take each leaf from whichever tree holds it.

    Raises:
      ValueError: if the two trees do not come from the same `split` (different structure,
        metadata, a leaf present in both, or a leaf missing from both — which happens when
        the halves were split with different `extra` and would drop that parameter).
    """
    if _structure(trainable) != _structure(frozen):
        raise ValueError(
            "combine: the trainable and frozen trees have different structures or SVFT "
            "metadata; they must come from the same `split` (or the same `apply` config).\n"
            f"trainable: {_structure(trainable)}\nfrozen:    {_structure(frozen)}"
        )

    def pick(path, a, b, optional=False):
        if a is not None and b is not None:
            raise ValueError(f"combine: leaf {path!r} is present in both trees; pass the two halves of one `split`.")
        if a is None and b is None and not optional:
            # A parameter that neither half holds would silently vanish from the model (e.g.
            # halves split with different `extra`), so this is an error, not a None leaf.
            raise ValueError(f"combine: leaf {path!r} is missing from both trees; pass the two halves of one `split` (with the same `extra`).")
        return a if a is not None else b

    def pick_node(path, a, b):
        # A node's optional fields (SVFT's gate, base) are legitimately None in both halves.
        return dataclasses.replace(
            a, **{field: pick(f"{path}/{field}", getattr(a, field), getattr(b, field), optional=True)
                  for field in a.DATA_FIELDS}
        )

    def pick_any(path, a, b):
        if is_node(a) and is_node(b):
            return pick_node(path, a, b)
        return pick(path, a, b)

    return _map_pairs(pick_any, trainable, frozen)


def _map_pairs(fn, first, second):
    """fn(path, a, b) over positions of two same-structure trees, nodes and None as leaves."""
    is_leaf = lambda x: x is None or is_node(x)  # noqa: E731
    flat_first, treedef = jax.tree_util.tree_flatten_with_path(first, is_leaf=is_leaf)
    flat_second = treedef.flatten_up_to(second)
    return treedef.unflatten(
        [fn(path_to_str(path), a, b) for (path, a), b in zip(flat_first, flat_second, strict=True)]
    )
