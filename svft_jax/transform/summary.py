"""`summary`: a per-target table and PEFT-style trainable-parameter totals."""

from __future__ import annotations

import math

import jax

from svft_jax._paths import compile_regex, map_with_path, matches
from svft_jax.transform.node import is_node


def count_parameters(adapted, extra: str | None = None) -> dict:
    """Parameter counts of an adapted tree, measured against the original model.

    Returns:
      {"trainable": M entries + gates + `extra` leaves, "total": parameters of the original
       model (each node counts as its kernel), "targets": number of adapter nodes,
       "percent": 100 · trainable / total}.
    """
    extra_re = compile_regex(extra, "extra")
    counts = {"trainable": 0, "total": 0, "targets": 0}

    def visit(path, x):
        if is_node(x):
            counts["trainable"] += x.num_trainable
            counts["total"] += math.prod(x.kernel_shape)
            counts["targets"] += 1
        elif hasattr(x, "size"):
            counts["total"] += int(x.size)
            if matches(extra_re, path):
                counts["trainable"] += int(x.size)
        return x

    map_with_path(visit, adapted, is_leaf=is_node)
    counts["percent"] = 100.0 * counts["trainable"] / max(counts["total"], 1)
    return counts


def summary(adapted, extra: str | None = None, print_fn=print) -> str:
    """Print (and return) one row per SVFT target and the trainable-parameter totals.

    Columns: path, W shape (d1×d2, with the layer stack), method (e.g. svft-banded(d=2)),
    rank r, entries per layer (|Ω| for SVFT), trainable scalars. The last line reads like PEFT's `print_trainable_parameters`.
    """
    rows = []
    for node in jax.tree_util.tree_leaves(adapted, is_leaf=is_node):
        if not is_node(node):
            continue
        rows.append((*node.summary_row(), str(node.num_trainable)))
    header = ("target", "W (out×in)", "method", "rank", "entries", "trainable")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    counts = count_parameters(adapted, extra)
    text = "\n".join(
        [line(header), line(tuple("-" * w for w in widths)), *map(line, rows),
         f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} || "
         f"trainable%: {counts['percent']:.4f} || adapted targets: {counts['targets']}"]
    )
    if print_fn is not None:
        print_fn(text)
    return text
