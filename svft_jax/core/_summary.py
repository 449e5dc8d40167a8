"""`summary` and `count_parameters`: a per-target table and PEFT-style totals, for any method."""

from __future__ import annotations

import math

import jax

from svft_jax.core._merge import check_whole
from svft_jax.core._partition import extra_paths
from svft_jax.core._protocol import is_marker, is_node, is_special
from svft_jax.core._targets import flatten_by_path


def count_parameters(adapted, extra: str | None = None) -> dict:
    """Parameter counts of an adapted tree, measured against the original model.

    Arrays that appear twice in the tree as the same buffer (tied weights) count once.

    Returns:
      {"trainable": adapter parameters + fully-trained leaves, "total": parameters of the
       original model (each node counts as its kernel), "targets": number of adapter nodes,
       "percent": 100 · trainable / total}.
    Raises:
      ValueError for one half of `split` (its totals would be wrong): combine first.
    """
    check_whole(adapted, "count_parameters")
    extras = extra_paths(adapted, extra, "count_parameters")
    counts = {"trainable": 0, "total": 0, "targets": 0}
    seen: set[int] = set()
    for path, x in flatten_by_path(adapted).items():
        if is_node(x):
            counts["trainable"] += x.num_trainable
            counts["total"] += math.prod(x.kernel_shape)
            counts["targets"] += 1
            continue
        value = x.value if is_marker(x) else x
        if not hasattr(value, "shape") or id(value) in seen:
            continue
        seen.add(id(value))
        size = math.prod(value.shape)
        counts["total"] += size
        if path in extras:
            counts["trainable"] += size
    counts["percent"] = 100.0 * counts["trainable"] / max(counts["total"], 1)
    return counts


def summary(adapted, extra: str | None = None, print_fn=print) -> str:
    """Print (and return) one row per adapted target and the trainable-parameter totals.

    Columns: path, W shape (d1×d2, with the layer stack), method (e.g. svft-banded(d=2)),
    update rank, trainable entries per layer, trainable scalars, notes (e.g. near-repeated
    singular values, whose singular vectors depend on the SVD routine). The last line reads
    like PEFT's `print_trainable_parameters`.
    """
    rows = []
    for node in jax.tree_util.tree_leaves(adapted, is_leaf=is_special):
        if not is_node(node):
            continue
        layout = node.layout
        stack = "×".join(map(str, layout.stack_shape))
        shape = f"{stack + '×' if stack else ''}{layout.d1}×{layout.d2}"
        rows.append((node.path, shape, node.describe(), str(node.update_rank), str(node.entries_per_layer),
                     str(node.num_trainable), node.notes()))
    header = ("target", "W (out×in)", "method", "rank", "entries", "trainable", "notes")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    counts = count_parameters(adapted, extra)
    footer = [f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} || "
              f"trainable%: {counts['percent']:.4f} || adapted targets: {counts['targets']}"]
    if any(r[6] for r in rows):
        footer.append("note: near-repeated singular values make singular vectors non-unique; an adapter on such a "
                      "target is tied to the SVD back-end that made it (adapter files check this on load).")
    text = "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows), *footer])
    if print_fn is not None:
        print_fn(text)
    return text
