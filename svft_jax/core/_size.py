"""`plan`: what `apply` would build — per target layout, rank, |Ω|, trainable count, memory and
training FLOPs — computed from shapes alone, with no SVD (works on `jax.eval_shape` trees).

There is one planning code path. Every method registers a `Planner`:

  make_plans(params, **options) -> Planned     the method's validated per-target plans (the
                                               same call its `apply` makes before `build`)
  arrays(plan) -> {name: ArraySpec}            the shapes and dtypes of the arrays `build`
                                               creates for one plan (tests check them against
                                               the built nodes)

so `plan(params, method=..., **options)` and `apply(params, **options)` read the same plans
and the numbers cannot disagree. `budget=` (SVFT) is resolved inside `make_plans`, so `apply`
and `plan` also make the same choice of d or k.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from svft_jax._registry import Registry
from svft_jax.core._protocol import is_marker, is_node
from svft_jax.core._targets import flatten_by_path


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One array a node will hold: shape, dtype name, role ("trainable", "frozen" or "base"),
    and `shared`: a key naming a buffer several nodes share (VeRA's random pair), else None."""

    shape: tuple[int, ...]
    dtype: str
    role: str
    shared: Any = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Planned:
    """What a method's `make_plans` returns: the plans `build` consumes, the node class, the
    paths `extra` marks, and what `budget=` chose ({} without a budget)."""

    plans: list
    node_cls: type
    extra: list
    choice: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Planner:
    method: str
    make_plans: Callable[..., Planned]
    arrays: Callable[[Any], dict[str, ArraySpec]]
    #: the width of the factored update and whether W0 is applied densely (for the cost model).
    update_rank: Callable[[Any], int]
    has_base: Callable[[Any], bool] = lambda plan: True
    #: short method text (as the node's `describe()`).
    describe: Callable[[Any], str] = lambda plan: plan.__class__.__name__
    #: trainable values per layer as `summary` shows them (None: trainable / layers).
    entries: Callable[[Any], int] | None = None


PLANNERS: Registry[Planner] = Registry("adapter method", "method")


def register_planner(planner: Planner) -> Planner:
    return PLANNERS.register(planner.method, planner)


def _planner(method: str) -> Planner:
    return PLANNERS.get(method)


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
class PlanReport:
    """The result of `plan`: per-target rows, totals, the plans `apply` builds from, and what
    `budget=` chose. `str(report)` / `report.table()` is the printed table."""

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


def trainable_count(planner: Planner, plan) -> int:
    return sum(a.size for a in planner.arrays(plan).values() if a.role == "trainable")


def report(planner: Planner, planned: Planned, leaves: Mapping[str, Any], tokens: int) -> PlanReport:
    """Rows and totals of `planned` (the method's plans over `leaves`)."""
    from svft_jax.core._cost import step_flops

    rows, shared_seen = [], set()
    totals = {"trainable": 0, "factor_bytes": 0, "trainable_bytes": 0, "base_bytes": 0, "flops_per_token": {}}
    for plan in planned.plans:
        arrays = planner.arrays(plan)
        layout = plan.layout
        layers = math.prod(layout.stack_shape)
        trainable = sum(a.size for a in arrays.values() if a.role == "trainable")
        trainable_bytes = sum(a.nbytes for a in arrays.values() if a.role == "trainable")
        factor_bytes = sum(a.nbytes for a in arrays.values() if a.role == "frozen")
        base_bytes = sum(a.nbytes for a in arrays.values() if a.role == "base")
        unshared = sum(a.nbytes for a in arrays.values() if a.role == "frozen" and (a.shared is None or a.shared not in shared_seen))
        shared_seen.update(a.shared for a in arrays.values() if a.shared is not None)
        rank = planner.update_rank(plan)
        costs = step_flops(layout.d1, layout.d2, rank, tokens, has_base=planner.has_base(plan))
        per_token = {name: layers * value / tokens for name, value in costs.items()}
        stack = "×".join(map(str, layout.stack_shape))
        rows.append(TargetRow(plan.path, f"{stack + '×' if stack else ''}{layout.d1}×{layout.d2}", planner.describe(plan),
                              rank, planner.entries(plan) if planner.entries else trainable // max(layers, 1), trainable, factor_bytes, trainable_bytes, base_bytes,
                              per_token, arrays))
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
    return PlanReport(planner.method, tuple(rows), totals, tuple(planned.plans), tuple(planned.extra),
                      dict(planned.choice), tokens)


def plan(params, pattern: str | None = None, *, method: str = "svft", tokens: int = 1024, print_fn=None, **options) -> PlanReport:
    """What `apply` (or a baseline's `apply`) would build, from shapes alone: no SVD runs.

    Args:
      params: a parameter pytree, concrete or a `jax.eval_shape` tree of `jax.ShapeDtypeStruct`
        (e.g. `model_cls(config, _do_init=False).params_shape_tree`).
      pattern: SVFT's pattern (method="svft"; default "plain").
      method: "svft", "lora", "dora", "vera" (or any registered method).
      tokens: T, tokens per call, for the per-token training FLOPs (the rebuild strategy's
        per-step merge is spread over T).
      print_fn: e.g. `print` to print the table.
      **options: exactly the method's `apply` options (SVFT: d, k, rank, targets, exclude,
        overrides, extra, seed, factor_dtype, init, keep_base, svd_backend, svd_dtype, budget;
        LoRA: rank, alpha, targets, ...).
    Returns:
      A `PlanReport`: `.rows` (per target: layout, rank, entries = |Ω|, trainable, factor /
      trainable / W0 bytes, training FLOPs per token per strategy of
      `svft_jax.core._cost.step_flops`), `.totals`, `.plans`, `.choice` (what `budget`
      picked), and `str(report)`, the table.
    Raises:
      ValueError/TypeError as `apply` would, before anything is computed.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"`tokens` must be a positive int, got {tokens!r}.")
    planner = _planner(method)
    if method == "svft":
        options["pattern"] = "plain" if pattern is None else pattern
    elif pattern is not None:
        raise ValueError(f"pattern={pattern!r} is an SVFT option; method={method!r} takes {method}'s own options (e.g. rank=).")
    planned = planner.make_plans(params, **options)
    result = report(planner, planned, flatten_by_path(params), tokens)
    if print_fn is not None:
        print_fn(result.table())
    return result


def node_arrays(node) -> dict[str, ArraySpec]:
    """{name: (shape, dtype name)} of the arrays a built node holds (compare with a planner's
    `arrays(plan)`)."""
    out = {}
    for name in type(node).data_fields():
        value = getattr(node, name)
        if value is not None:
            out[name] = (tuple(value.shape), np.dtype(value.dtype).name)
    return out
