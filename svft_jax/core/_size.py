"""`size`: what `adapt` (or `apply`) would build — per target layout, rank, |Ω|, trainable
count, memory and training FLOPs — computed from shapes alone, with no SVD (works on
`jax.eval_shape` trees). It reads the very plans `adapt` builds from (`plan_adapt`), and each
plan says what its node holds (`Plan.arrays`), so the numbers cannot disagree.

Called `plan`/`PlanReport` before issue 19 ("plan" also named each target's `Plan`); those
names stay as aliases for one release.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from svft_jax.core._adapt import Planned, plan_adapt
from svft_jax.core._cost import step_flops
from svft_jax.core._protocol import ArraySpec, is_marker, is_node
from svft_jax.core._rules import Method, Rule, keyword_rules
from svft_jax.core._targets import flatten_by_path


@dataclasses.dataclass(frozen=True)
class TargetRow:
    """One target of a plan.

    Attributes:
      path, shape ('L×d1×d2'), method (text), rank (update rank), entries (trainable values per
      layer: |Ω| for SVFT), trainable (scalars), factor_bytes (frozen arrays the method adds: U,
      s, V or LoRA's nothing, VeRA's shared pair), trainable_bytes, base_bytes (W0 if the node
      keeps it), flops_per_token ({strategy: multiply-adds per token of one training step}).
    """

    path: str
    shape: str
    method: str
    rank: int
    entries: int
    trainable: int
    factor_bytes: int
    trainable_bytes: int
    base_bytes: int
    flops_per_token: dict
    arrays: dict


@dataclasses.dataclass(frozen=True)
class SizeReport:
    """The result of `size`: per-target rows, totals, the plans `adapt` builds from, and what
    a whole-set option (SVFT's `budget=`) chose. `str(report)` / `report.table()` is the table."""

    method: str
    rows: tuple
    totals: dict
    plans: tuple
    extra: tuple
    choice: dict
    tokens: int

    def table(self) -> str:
        strategies = list(self.totals["flops_per_token"])
        header = ("target", "W (out×in)", "method", "rank", "entries", "trainable", "factors MiB", "base MiB",
                  *[f"{s} MFLOP/tok" for s in strategies])
        rows = [(r.path, r.shape, r.method, str(r.rank), str(r.entries), f"{r.trainable:,}", _mib(r.factor_bytes),
                 _mib(r.base_bytes), *[f"{r.flops_per_token[s] / 1e6:.3f}" for s in strategies]) for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(cells):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

        t = self.totals
        footer = [f"trainable params: {t['trainable']:,} || all params: {t['total']:,} || trainable%: {t['percent']:.4f} || adapted targets: {t['targets']}",
                  f"memory: factors {_mib(t['factor_bytes'])} MiB, trainable {_mib(t['trainable_bytes'])} MiB, kept W0 {_mib(t['base_bytes'])} MiB; "
                  + ", ".join(f"{s} {v / 1e9:.4f} GFLOP/token" for s, v in t["flops_per_token"].items())
                  + f" (training step, T={self.tokens} tokens per call)"]
        if self.choice:
            footer.append("budget: " + ", ".join(f"{k}={v}" for k, v in self.choice.items()))
        return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows), *footer])

    def __str__(self) -> str:
        return self.table()


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"


def leaf_size(leaf) -> int:
    return math.prod(leaf.shape) if hasattr(leaf, "shape") else 0


def total_parameters(leaves: Mapping[str, Any]) -> int:
    """Scalars of the model (nodes as their kernel; tied buffers once, as `count_parameters`)."""
    total, seen = 0, set()
    for x in leaves.values():
        if is_node(x):
            total += math.prod(x.kernel_shape)
            continue
        value = x.value if is_marker(x) else x
        if not hasattr(value, "shape") or (not isinstance(value, jax.ShapeDtypeStruct) and id(value) in seen):
            continue
        seen.add(id(value))
        total += leaf_size(value)
    return total


def report(planned: Planned, leaves: Mapping[str, Any], tokens: int) -> SizeReport:
    """Rows and totals of `planned` (the plans over `leaves`)."""
    rows, shared_seen = [], set()
    totals = {"trainable": 0, "factor_bytes": 0, "trainable_bytes": 0, "base_bytes": 0, "flops_per_token": {}}
    for plan in planned.plans:
        arrays = plan.arrays()
        layout = plan.layout
        layers = math.prod(layout.stack_shape)
        trainable = sum(a.size for a in arrays.values() if a.role == "trainable")
        trainable_bytes = sum(a.nbytes for a in arrays.values() if a.role == "trainable")
        factor_bytes = sum(a.nbytes for a in arrays.values() if a.role == "frozen")
        base_bytes = sum(a.nbytes for a in arrays.values() if a.role == "base")
        unshared = sum(a.nbytes for a in arrays.values() if a.role == "frozen" and (a.shared is None or a.shared not in shared_seen))
        shared_seen.update(a.shared for a in arrays.values() if a.shared is not None)
        rank = plan.update_rank
        costs = step_flops(layout.d1, layout.d2, rank, tokens, has_base=plan.has_base)
        per_token = {name: layers * value / tokens for name, value in costs.items()}
        stack = "×".join(map(str, layout.stack_shape))
        entries = plan.entries if plan.entries is not None else trainable // max(layers, 1)
        rows.append(TargetRow(plan.path, f"{stack + '×' if stack else ''}{layout.d1}×{layout.d2}", plan.describe(),
                              rank, entries, trainable, factor_bytes, trainable_bytes, base_bytes, per_token, arrays))
        totals["trainable"] += trainable
        totals["trainable_bytes"] += trainable_bytes
        totals["factor_bytes"] += unshared
        totals["base_bytes"] += base_bytes
        for name, value in per_token.items():
            totals["flops_per_token"][name] = totals["flops_per_token"].get(name, 0.0) + value
    extra_size = sum(leaf_size(leaves[p]) for p in planned.extra)
    totals["trainable"] += extra_size
    totals["extra"] = extra_size
    totals["total"] = total_parameters(leaves)
    totals["targets"] = len(planned.plans)
    totals["percent"] = 100.0 * totals["trainable"] / max(totals["total"], 1)
    method = "+".join(dict.fromkeys(config.name for config, _ in planned.groups)) if planned.groups else ""
    return SizeReport(method, tuple(rows), totals, tuple(planned.plans), tuple(planned.extra), _choice(planned), tokens)


def _choice(planned: Planned) -> dict:
    """What whole-set options chose: `planned.choice` (the keyword spelling's), else each config's
    own (`budget_choice`, e.g. `SVFT(budget=N)`); several such configs are listed in order."""
    if planned.choice:
        return dict(planned.choice)
    chosen = [c for c in (getattr(config, "budget_choice", lambda plans: {})(plans) for config, plans in planned.groups) if c]
    return chosen[0] if len(chosen) == 1 else {f"budgeted config {i}": c for i, c in enumerate(chosen)}


def _check_tokens(tokens) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"`tokens` must be a positive int, got {tokens!r}.")


def size(params, config_or_rules: Method | Rule | list[Rule], *, targets: str | None = None, exclude: str | None = None,
         extra: str | None = None, tokens: int = 1024, print_fn=None) -> SizeReport:
    """What `adapt(params, config_or_rules, ...)` would build, from shapes alone: no SVD runs.

    Args:
      params: a parameter pytree, concrete or a `jax.eval_shape` tree of `jax.ShapeDtypeStruct`
        (e.g. `model_cls(config, _do_init=False).params_shape_tree`).
      config_or_rules, targets, exclude, extra: as `adapt` takes them.
      tokens: T, tokens per call, for the per-token training FLOPs (the rebuild strategy's
        per-step merge is spread over T).
      print_fn: e.g. `print` to print the table.
    Returns:
      A `SizeReport`: `.rows` (per target: layout, rank, entries (|Ω| for SVFT), trainable,
      factor / trainable / W0 bytes, training FLOPs per token per strategy of
      `svft_jax.strategies.step_flops`), `.totals`, `.plans`, and `str(report)`, the table.
    Raises:
      ValueError/TypeError as `adapt` would, before anything is computed.
    """
    _check_tokens(tokens)
    leaves = flatten_by_path(params)
    planned = plan_adapt(params, config_or_rules, targets=targets, exclude=exclude, extra=extra, leaves=leaves)
    return _finish(report(planned, leaves, tokens), print_fn)


def _finish(result: SizeReport, print_fn) -> SizeReport:
    if print_fn is not None:
        print_fn(result.table())
    return result


def plan(params, pattern: str | None = None, *, method: str = "svft", tokens: int = 1024, print_fn=None, **options) -> SizeReport:
    """`size` with a method's `apply` keywords (its name before issue 19; kept one release).

    Args:
      params: as `size`.
      pattern: SVFT's pattern (method="svft"; default "plain").
      method: "svft", "lora", "dora", "vera" (or any registered method whose node defines
        `plan_options`, the planning half of its keyword `apply`).
      tokens, print_fn: as `size`.
      **options: exactly the method's `apply` options (SVFT: d, k, rank, targets, exclude,
        overrides, extra, seed, factor_dtype, init, keep_base, svd_backend, svd_dtype, budget;
        LoRA: rank, alpha, targets, ...).
    Returns:
      A `SizeReport` (`.choice`: what SVFT's `budget` picked).
    """
    from svft_jax.core._protocol import METHODS

    _check_tokens(tokens)
    node_cls = METHODS.get(method)
    if method == "svft":
        options["pattern"] = "plain" if pattern is None else pattern
    elif pattern is not None:
        raise ValueError(f"pattern={pattern!r} is an SVFT option; method={method!r} takes {method}'s own options (e.g. rank=).")
    plan_options = getattr(node_cls, "plan_options", None)  # a method's own keyword planning (SVFT's budget)
    planned = plan_options(params, **options) if plan_options is not None else _keyword_plans(node_cls, params, **options)
    return _finish(report(planned, flatten_by_path(params), tokens), print_fn)


def _keyword_plans(node_cls, params, *, targets=None, exclude=None, layouts=None, extra=None, **options) -> Planned:
    """The planning half of a method's keyword spelling: `config_cls(**options)` on every
    target, `layouts` as rules."""
    if node_cls.config_cls is None:
        raise TypeError(f"method {node_cls.method!r} has no typed config: define a `svft_jax.core.Method` subclass "
                        f"with `node = {node_cls.__name__}` to plan it by name.")
    rules = keyword_rules(node_cls.config_cls(**options), layouts)
    return plan_adapt(params, rules, targets=targets, exclude=exclude, extra=extra)


PlanReport = SizeReport  # its name before issue 19, kept one release


def node_arrays(node) -> dict[str, ArraySpec]:
    """{name: (shape, dtype name)} of the arrays a built node holds (compare with the plan's
    `arrays()`)."""
    out = {}
    for name in type(node).data_fields():
        value = getattr(node, name)
        if value is not None:
            out[name] = (tuple(value.shape), np.dtype(value.dtype).name)
    return out
