"""Which leaves train: labels, masks, and equinox-style split/combine.

Trainable leaves are each adapter node's `trainable()` fields (SVFT: M and the reference gate;
LoRA: A and B; ...) plus the leaves marked `Trainable` (declared once, by `apply(..., extra=)`
or `mark_trainable`). Everything else — U, s, V, W0 and every untouched parameter — is frozen.

The `extra=` keyword of `split`, `labels`, `trainable_mask`, `optimizer`, `summary` and
`count_parameters` is kept for trees without markers; on a marked tree it must name exactly
the marked leaves (a different regex raises instead of silently freezing a leaf).
"""

from __future__ import annotations

import dataclasses

import jax

from svft_jax._paths import compile_regex, matches, path_to_str
from svft_jax.core._protocol import AdapterNode, Trainable, is_marker, is_node, is_special
from svft_jax.core._targets import flatten_by_path

FROZEN, ADAPTER, EXTRA = "frozen", "adapter", "extra"


def extra_paths(tree, extra: str | None, caller: str) -> set[str]:
    """The paths of fully-trained leaves: the markers, or (unmarked tree) `extra`'s matches.

    Raises:
      ValueError: `extra` matches no leaf, or disagrees with the markers the tree carries.
    """
    extra_re = compile_regex(extra, "extra")
    # On one half of `split`, the other half's leaves are None positions: a regex may name them.
    leaves = flatten_by_path(tree, keep_none=True)
    marked = {p for p, x in leaves.items() if is_marker(x)}
    if extra_re is None:
        return marked
    plain = {p for p, x in leaves.items() if not is_special(x) and x is not None}
    holes = {p for p, x in leaves.items() if x is None}
    matched = {p for p in plain | marked | holes if matches(extra_re, p)}
    if marked:
        if matched != marked:
            only_regex, only_marked = sorted(matched - marked), sorted(marked - matched)
            raise ValueError(
                f"{caller}: extra={extra!r} conflicts with the trainable set the tree already carries "
                f"(declared at apply time: {sorted(marked)[:4]}); regex-only {only_regex[:4]}, marked-only "
                f"{only_marked[:4]}. Drop `extra=` here (the tree knows), or re-apply with the new one.")
        return marked
    if not matched:
        raise ValueError(f"{caller}: extra={extra!r} matches no parameter; paths are '/'-joined and matched in full, e.g. {sorted(plain)[:6]}.")
    return matched


def _node_labels(node: AdapterNode) -> AdapterNode:
    """The node with each array field replaced by its label (None stays None)."""
    trainable = node.trainable_fields()
    return dataclasses.replace(node, **{
        field: None if getattr(node, field) is None else (ADAPTER if field in trainable else FROZEN)
        for field in node.data_fields()})


def labels(tree, extra: str | None = None):
    """A pytree of strings: "adapter" on adapter parameters, "extra" on fully-trained leaves,
    else "frozen". Works on the full adapted tree and on either half of `split`, so it can serve
    as `optax.multi_transform`'s `param_labels`."""
    extras = extra_paths(tree, extra, "labels")

    def label(path, x):
        if is_node(x):
            return _node_labels(x)
        if is_marker(x):
            return Trainable(None if x.value is None else EXTRA)
        return EXTRA if path in extras else FROZEN

    return jax.tree_util.tree_map_with_path(lambda p, x: label(path_to_str(p), x), tree, is_leaf=is_special)


def trainable_mask(adapted, extra: str | None = None):
    """Bool pytree with the structure of `adapted`: True on adapter parameters and extras."""
    return jax.tree_util.tree_map(lambda label: label != FROZEN, labels(adapted, extra))


def split(adapted, extra: str | None = None):
    """(trainable, frozen): two trees shaped like `adapted`, with None where the other holds.

    `jax.grad(loss)(trainable, frozen, ...)` then differentiates the adapters and extras alone.
    """
    mask = trainable_mask(adapted, extra)
    trainable = jax.tree_util.tree_map(lambda x, keep: x if keep else None, adapted, mask)
    frozen = jax.tree_util.tree_map(lambda x, keep: None if keep else x, adapted, mask)
    return trainable, frozen


def _positions(tree):
    is_leaf = lambda x: x is None or is_special(x)  # noqa: E731
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)


def _first_difference(trainable, frozen) -> str:
    """Where two trees stop lining up, in one line (not two 20k-character treedefs)."""
    a, b = dict(), dict()
    for target, tree in ((a, trainable), (b, frozen)):
        for path, leaf in _positions(tree)[0]:
            target[path_to_str(path)] = leaf
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        return f"paths only in the trainable tree: {only_a[:3]}; only in the frozen tree: {only_b[:3]}"
    for path in a:
        x, y = a[path], b[path]
        if is_special(x) != is_special(y) or type(x) is not type(y) and is_special(x):
            return f"{path!r} is a {type(x).__name__} in one tree and a {type(y).__name__} in the other"
        if is_node(x) and x.meta != y.meta:
            return f"{path!r} has different adapter configurations ({x.describe()} vs {y.describe()}, or another Ω/layout)"
    return "the tree structures differ"


def combine(trainable, frozen):
    """The inverse of `split`: take each leaf from whichever tree holds it.

    Raises:
      ValueError: the two trees do not come from the same `split` (it names the first path that
        differs), a leaf is present in both, or a leaf is missing from both.
    """
    flat_a, treedef = _positions(trainable)
    if jax.tree_util.tree_structure(frozen, is_leaf=lambda x: x is None) != jax.tree_util.tree_structure(trainable, is_leaf=lambda x: x is None):
        raise ValueError(f"combine: the trainable and frozen trees do not come from the same `split` — {_first_difference(trainable, frozen)}.")
    flat_b = treedef.flatten_up_to(frozen)

    def pick(path, a, b, optional=False):
        if a is not None and b is not None:
            raise ValueError(f"combine: leaf {path!r} is present in both trees; pass the two halves of one `split`.")
        if a is None and b is None and not optional:
            raise ValueError(f"combine: leaf {path!r} is missing from both trees; pass the two halves of one `split` (with the same `extra`).")
        return a if a is not None else b

    def pick_any(path, a, b):
        if is_node(a) or is_marker(a):
            # A node's optional fields (SVFT's gate, base) are legitimately None in both halves.
            fields = a.data_fields() if is_node(a) else ("value",)
            return dataclasses.replace(a, **{f: pick(f"{path}/{f}", getattr(a, f), getattr(b, f), optional=is_node(a))
                                             for f in fields})
        return pick(path, a, b)

    return treedef.unflatten([pick_any(path_to_str(p), a, b) for (p, a), b in zip(flat_a, flat_b, strict=True)])
