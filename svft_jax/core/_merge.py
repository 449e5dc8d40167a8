"""Dense weights from adapter nodes, for any method of the protocol."""

from __future__ import annotations

import jax

from svft_jax._paths import path_to_str
from svft_jax.core._protocol import AdapterNode, is_marker, is_node, is_special


def is_split_half(node: AdapterNode) -> bool:
    """True for a node from one half of `split` (all its trainable or all its frozen arrays
    are None): it cannot be merged or saved until `combine` puts it back together."""
    trainable = [getattr(node, f) for f in node.trainable_fields()]
    frozen = [getattr(node, f) for f in node.data_fields() if f not in node.trainable_fields()]
    return all(x is None for x in trainable) or all(x is None for x in frozen)


def check_whole(tree, caller: str) -> None:
    """Refuse a half of `split` (None leaves, half nodes) with the fix."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None or is_special(x))[0]:
        half = leaf is None or (is_node(leaf) and is_split_half(leaf)) or (is_marker(leaf) and leaf.value is None)
        if half:
            raise ValueError(f"{caller}: {path_to_str(path)!r} is missing (None): this is one half of svft_jax.split. Pass svft_jax.combine(trainable, frozen) instead.")


def merge(adapted):
    """Replace every adapter node by its dense kernel and unwrap `Trainable` markers.

    Args:
      adapted: a pytree from `svft_jax.apply`, a baseline's `apply`, or `combine`.
    Returns:
      A plain parameter pytree with the structure and dtypes of the original `params`, which
      the unmodified model's `apply` accepts. Differentiable and jit-able.
    Raises:
      ValueError for one half of `split` (combine the halves first).
    """
    check_whole(adapted, "merge")
    return jax.tree_util.tree_map(
        lambda x: x.materialize() if is_node(x) else (x.value if is_marker(x) else x), adapted, is_leaf=is_special
    )


def strip_markers(tree):
    """`tree` with `Trainable` markers unwrapped (adapter nodes kept)."""
    return jax.tree_util.tree_map(lambda x: x.value if is_marker(x) else x, tree, is_leaf=is_special)


def weight_matrix(node: AdapterNode):
    """The adapted W of any adapter node, float32: (*stack, d1, d2) (d1 = out, d2 = in)."""
    return node.weight()


def delta_matrix(node: AdapterNode):
    """The update ΔW = W − W0 of any adapter node, float32: (*stack, d1, d2)."""
    return node.delta()
