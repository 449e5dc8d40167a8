"""SVFT's typed config and its keyword spelling: `SVFT(pattern=Banded(d=2), rank=None, ...)`
plans one target (validated, naming its path, before any SVD); `apply(params, pattern, d=...)`
is sugar that builds `Rule`s — one per `overrides` entry, then every target — and hands them to
the core's verb. `budget` (a whole-set choice of d or k) is a field of the config, solved by
`SVFT.plans` over the targets the config adapts (`_solve_budget`); `apply(budget=)` turns its
fraction or count into that field, less what `extra` leaves and size-setting overrides train.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax._args import check_bool, check_float_dtype, check_seed
from svft_jax.core._adapt import Planned, build, plan_adapt
from svft_jax.core._rules import Method, Rule
from svft_jax.core._targets import flatten_by_path
from svft_jax.errors import PrecisionWarning
from svft_jax.methods.svft import _factorize
from svft_jax.methods.svft._node import SVFTNode, SVFTPlan
from svft_jax.patterns import Banded, Named, Pattern, PatternOptions, Plain, get_pattern

INITS = ("zeros", "reference")
OVERRIDE_KEYS = ("pattern", "d", "k", "rank", "seed", "init", "factor_dtype", "layout", "keep_base")
BUDGET_PATTERNS = ("banded", "random", "topk")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SVFT(Method):
    """SVFT's config (Lingam et al., NeurIPS 2024): W = W0 + U M Vᵀ, M sparse on `pattern`.

    Attributes:
      pattern: a typed pattern spec (`Plain()`, `Banded(d=2)`, `Random(k=64)`, `TopK(k=64)`, or
        `Named(pattern="mine", d=..., k=...)` for a pattern registered with `register_pattern`).
      rank: r, singular triplets kept (None: min(d1, d2)).
      seed: seeds the random pattern and init="reference" (with a checksum of each path).
      init: "zeros" (M = 0) or "reference" (the authors' Kaiming-normal m · sigmoid(gate)).
      factor_dtype: dtype of the stored U, s, V (M is always float32).
      keep_base: store W0 in the node (exact W0 at M = 0; needed below full rank).
      svd_backend: "auto", "numpy", "jax" or "randomized"; svd_dtype: "float32" or "float64".
      budget: pick the pattern's size instead of setting it: an absolute count (int) of trainable
        scalars for the targets this config adapts (M's entries, plus the gate of
        init="reference"). With `Banded()` (no d) one d for every target, the largest whose
        total fits; with `Random()`/`TopK()` (no k) k proportional to each target's rank,
        k = ⌊K·r/r_max⌋ with the largest K that fits. The pattern must leave its d/k unset.
        A fraction of the whole model (`apply(budget=0.01)`) stays a keyword of `apply`/`plan`:
        a config sees only its own targets, not the model they belong to.
    Options are checked per target when planned, so every message names the parameter path.
    """

    node: ClassVar[type] = SVFTNode
    pattern: Pattern = Plain()
    rank: int | None = None
    seed: int = 0
    init: str = "zeros"
    factor_dtype: Any = "float32"
    keep_base: bool = True
    svd_backend: str = "auto"
    svd_dtype: str = "float32"
    budget: int | None = None

    def __post_init__(self):
        if isinstance(self.pattern, str):  # a registered name with no options of its own ("plain")
            object.__setattr__(self, "pattern", Pattern.of(self.pattern))
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"SVFT(pattern=...) must be a pattern spec such as svft_jax.Banded(d=2), got {self.pattern!r}.")
        if self.svd_dtype not in _factorize.SVD_DTYPES:
            raise ValueError(f"`svd_dtype` must be one of {_factorize.SVD_DTYPES}, got {self.svd_dtype!r}; to store the factors in bfloat16 pass factor_dtype=jnp.bfloat16.")
        name, d, k = self.pattern.pattern_name, getattr(self.pattern, "d", None), getattr(self.pattern, "k", None)
        if self.budget is None:
            if isinstance(self.pattern, Banded) and d is None:
                raise ValueError("SVFT(pattern=Banded()) has no band half-width: set it (Banded(d=2)) or let a trainable "
                                 "count choose it (SVFT(pattern=Banded(), budget=N)).")
            return
        if isinstance(self.budget, bool) or not isinstance(self.budget, int | np.integer):
            fraction = " (a fraction of the whole model is apply(budget=0.01)'s keyword: a config sees only its targets)" \
                if isinstance(self.budget, float | np.floating) else ""
            raise TypeError(f"SVFT(budget=...) is a count of trainable scalars (int), got {self.budget!r}{fraction}.")
        if self.budget < 1:
            raise ValueError(f"SVFT(budget=...) must be a positive count, got {self.budget!r}.")
        if name not in BUDGET_PATTERNS:
            raise ValueError(f"SVFT(budget=...) picks d (banded) or k (random/topk); pattern={name!r} has no size to pick. "
                             f"Use Banded(), Random() or TopK().")
        if d is not None or k is not None:
            set_ = ", ".join(f"{n}={v!r}" for n, v in (("d", d), ("k", k)) if v is not None)
            raise ValueError(f"SVFT(budget=...) picks {'d' if name == 'banded' else 'k'} itself; drop {set_} from the "
                             f"pattern or drop the budget.")
        object.__setattr__(self, "budget", int(self.budget))

    def values(self) -> dict:
        """The option values a target is planned from (the pattern's d, k flattened in; with a
        budget, the smallest size, which `plans` then replaces)."""
        d, k = getattr(self.pattern, "d", None), getattr(self.pattern, "k", None)
        if self.budget is not None:  # provisional values so each target validates
            d, k = (0, None) if self.pattern.pattern_name == "banded" else (None, 1)
        return {"pattern": self.pattern.pattern_name, "d": d, "k": k,
                "own": self.pattern.options().own,
                "rank": self.rank, "seed": self.seed, "init": self.init, "factor_dtype": self.factor_dtype,
                "keep_base": self.keep_base}

    def plan(self, target) -> SVFTPlan:
        if self.budget is not None:  # a budget is a choice over the whole set of targets
            return self.plans([target])[0]
        return plan_target(target, self.values(), _factorize.resolve_backend(self.svd_backend), self.svd_dtype)

    def plans(self, targets) -> list[SVFTPlan]:
        """Every target's plan; with `budget`, the one d (or K) that makes their trainable total
        the largest ≤ budget (`_solve_budget`)."""
        backend = _factorize.resolve_backend(self.svd_backend)  # once for the set
        plans = [plan_target(t, self.values(), backend, self.svd_dtype) for t in targets]
        if self.budget is None or not plans:
            return plans
        return _solve_budget(plans, list(range(len(plans))), 0, self.budget, self.pattern.pattern_name)[0]

    def budget_choice(self, plans) -> dict:
        """What `budget` chose on `plans` (this config's): {} without a budget."""
        if self.budget is None or not plans:
            return {}
        trainable = sum(_trainable(p) for p in plans)
        choice = {"budget": self.budget, "trainable": trainable}
        if self.pattern.pattern_name == "banded":
            choice["d"] = plans[0].d
        else:
            r_max = max(p.rank for p in plans)
            choice.update(k_at_max_rank=next(p.k for p in plans if p.rank == r_max), max_rank=r_max)
        return choice


def plan_target(target, config: dict, svd_backend: str, svd_dtype: str) -> SVFTPlan:
    """One target's validated `SVFTPlan` from option values (`SVFT`'s fields; d, k from its
    pattern); every message names the target's path."""
    path = target.path
    where = f"parameter {path!r}"
    layout = target.layout
    try:
        spec = get_pattern(config["pattern"])
        seed = check_seed(config["seed"])  # may come from `overrides`
        options = PatternOptions(d=config["d"], k=config["k"], seed=seed, own=config.get("own", ()))
        spec.check(options)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{where}: {err}") from err
    full = min(layout.d1, layout.d2)
    rank = config["rank"]
    if rank is None:
        rank = full
    elif isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise TypeError(f"{where}: `rank` must be an int or None, got {type(rank).__name__}.")
    elif not 1 <= rank <= full:
        raise ValueError(f"{where}: rank={rank} is out of range; W is {layout.d1}×{layout.d2}, so rank must be in [1, {full}] (or None for full rank).")
    rank = int(rank)
    count = spec.count(rank, options)
    if count > rank * rank:
        raise ValueError(f"{where}: k={count} entries do not fit in the {rank}×{rank} grid of M (rank {rank}); use k ≤ {rank * rank} or a larger rank.")
    init = config["init"]
    if init not in INITS:
        raise ValueError(f"`init` must be one of {INITS}, got {init!r} (for {where}).")
    keep_base = config["keep_base"]
    if not isinstance(keep_base, bool | np.bool_):
        raise TypeError(f"{where}: `keep_base` must be a bool, got {keep_base!r}.")
    if not keep_base and rank < full:
        raise ValueError(f"{where}: keep_base=False needs full rank (rank={full}); with rank={rank} the residual W0 − U_r Σ_r V_rᵀ must stay frozen, so the base weight is kept.")
    factor_dtype = check_float_dtype(config["factor_dtype"], "factor_dtype")
    if not keep_base and factor_dtype.itemsize < 4:
        warnings.warn(
            f"{where}: factor_dtype={factor_dtype.name} with keep_base=False rounds U, s, V, and U diag(s) Vᵀ "
            "then differs from W0 by ~0.3% at M = 0 (bfloat16 has 8 mantissa bits). Keep W0 (keep_base=True) "
            "for an exact base model, or use float32 factors.", PrecisionWarning, stacklevel=6)
    backend = svd_backend if svd_backend != "randomized" or rank < full else _factorize.resolve_backend("auto")
    return SVFTPlan(path=path, layout=layout, pattern=spec.name, d=options.d, k=options.k, seed=seed, pattern_options=options.own,
                    rank=rank, init=init, factor_dtype=factor_dtype.name, keep_base=bool(keep_base),
                    svd_backend=backend, svd_dtype=svd_dtype)


def override_rules(overrides, base: dict, svd_backend: str, svd_dtype: str) -> list[Rule]:
    """`apply`'s `overrides={regex: {option: value}}` as rules (in order), then the catch-all.

    An override inherits every option it does not set, except that a changed pattern does not
    silently inherit the global d or k (refused, naming the override)."""
    rules = []
    for regex, values in _compile_overrides(overrides, base):
        merged = {**base, **values}
        config = _config(merged, svd_backend, svd_dtype)
        rules.append(Rule(path=regex, method=config, layout=values.get("layout"), label=f"overrides key {regex!r}"))
    return [*rules, Rule(path=".*", method=_config(base, svd_backend, svd_dtype))]


def _config(values: dict, svd_backend: str, svd_dtype: str) -> SVFT:
    return SVFT(pattern=Named(pattern=values["pattern"], d=values["d"], k=values["k"]), rank=values["rank"],
                seed=values["seed"], init=values["init"], factor_dtype=values["factor_dtype"],
                keep_base=values["keep_base"], svd_backend=svd_backend, svd_dtype=svd_dtype)


def _compile_overrides(overrides, base_config: dict):
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        raise TypeError(f"`overrides` must be a mapping {{regex: {{option: value}}}}, got {type(overrides).__name__}.")
    compiled = []
    for regex, values in overrides.items():
        if not isinstance(values, Mapping):
            raise TypeError(f"overrides[{regex!r}] must be a dict of options, got {type(values).__name__}.")
        unknown = set(values) - set(OVERRIDE_KEYS)
        if unknown:
            raise ValueError(f"overrides[{regex!r}] has unknown options {sorted(unknown)}; allowed: {OVERRIDE_KEYS}.")
        if "pattern" in values and values["pattern"] != base_config["pattern"]:
            inherited = [f"{key}={base_config[key]!r}" for key in ("d", "k") if key not in values and base_config[key] is not None]
            if inherited:
                raise ValueError(f"overrides[{regex!r}] changes pattern to {values['pattern']!r} but would inherit the global {', '.join(inherited)}; set them in the override explicitly (None to drop).")
        compiled.append((regex, dict(values)))
    return compiled


def _budget_total(value, total_params: int) -> int:
    """`budget` as an absolute count of trainable scalars."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"`budget` must be a fraction of all parameters (float in (0, 1]) or a count (int), got {value!r}.")
    if isinstance(value, float | np.floating):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"`budget`={value!r} as a float is a fraction of all {total_params:,} parameters and must be in (0, 1]; pass an int for an absolute count.")
        return int(math.floor(value * total_params))
    if value < 1:
        raise ValueError(f"`budget` must be a positive count, got {value!r}.")
    return int(value)


def _solve_budget(plans: list, budgeted: list[int], fixed_count: int, limit: int, pattern: str):
    """Pick the one integer knob x that makes the trainable total the largest ≤ `limit`.

    banded: x = d, the same band half-width on every budgeted target (|Ω| = banded_count(r, d)).
    random/topk: x = K, the count at the largest rank r_max; each target gets
      k = clamp(⌊K · r / r_max⌋, 1, r²), i.e. entries proportional to its rank.
    Returns (new plans, choice dict).
    """
    from svft_jax.patterns import banded_count

    r_max = max(plans[i].rank for i in budgeted)

    def per_target(i, x):
        plan = plans[i]
        if pattern == "banded":
            return dataclasses.replace(plan, d=int(x), k=None)
        return dataclasses.replace(plan, d=None, k=int(min(max(x * plan.rank // r_max, 1), plan.rank * plan.rank)))

    def total(x):
        count = fixed_count
        for i in budgeted:
            plan = plans[i]
            entries = banded_count(plan.rank, x) if pattern == "banded" else min(max(x * plan.rank // r_max, 1), plan.rank**2)
            count += plan.layers * (entries + (plan.init == "reference"))
        return count

    lo, hi = (0, r_max - 1) if pattern == "banded" else (1, r_max * r_max)
    if total(lo) > limit:
        knob = "d=0" if pattern == "banded" else "k=1 per target"
        raise ValueError(f"`budget` allows {limit:,} trainable parameters but the smallest {pattern} pattern ({knob}) needs {total(lo):,}; raise the budget or narrow `targets`.")
    while lo < hi:  # the total is non-decreasing in x
        mid = (lo + hi + 1) // 2
        if total(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    new = list(plans)
    for i in budgeted:
        new[i] = per_target(i, lo)
    choice = {"budget": limit, "trainable": total(lo)}
    choice.update({"d": lo} if pattern == "banded" else {"k_at_max_rank": lo, "max_rank": r_max})
    return new, choice


def make_plans(
    params,
    pattern: str = "plain",
    *,
    d: int | None = None,
    k: int | None = None,
    rank: int | None = None,
    targets: str | None = None,
    exclude: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    extra: str | None = None,
    seed: int = 0,
    factor_dtype=jnp.float32,
    init: str = "zeros",
    svd_dtype: str = "float32",
    keep_base: bool = True,
    svd_backend: str = "auto",
    budget: int | float | None = None,
    leaves=None,
) -> Planned:
    """SVFT's keyword planning step (`apply`'s, and `svft_jax.plan`'s): the keywords as rules,
    the core's `plan_adapt`, then `budget` resolved on the plans. No SVD runs; works on
    `jax.ShapeDtypeStruct` trees."""
    from svft_jax.core._size import leaf_size, total_parameters

    seed = check_seed(seed)
    if svd_dtype not in _factorize.SVD_DTYPES:
        raise ValueError(f"`svd_dtype` must be one of {_factorize.SVD_DTYPES}, got {svd_dtype!r}; to store the factors in bfloat16 pass factor_dtype=jnp.bfloat16.")
    backend = _factorize.resolve_backend(svd_backend)
    check_float_dtype(factor_dtype, "factor_dtype")
    if budget is not None:
        if pattern not in BUDGET_PATTERNS:
            raise ValueError(f"`budget` picks d (banded) or k (random/topk); pattern={pattern!r} has no size to pick. Use one of {BUDGET_PATTERNS}.")
        if d is not None or k is not None:
            raise ValueError(f"`budget` picks {'d' if pattern == 'banded' else 'k'} itself; drop d={d!r}/k={k!r} or the budget.")
        # provisional values so each target validates; the budget replaces them below
        d, k = (0, None) if pattern == "banded" else (None, 1)
    base = {"pattern": pattern, "d": d, "k": k, "rank": rank, "seed": seed, "init": init,
            "factor_dtype": factor_dtype, "layout": None, "keep_base": keep_base}
    rules = override_rules(overrides, base, backend, svd_dtype)
    leaves = flatten_by_path(params) if leaves is None else leaves
    planned = plan_adapt(params, rules, targets=targets, exclude=exclude, extra=extra, leaves=leaves)
    if budget is None:
        return planned
    # The plans above are provisional (the smallest d or k): they say which targets share the
    # budget and what the rest (extra leaves, overrides that set a size) trains.
    plans = planned.plans
    limit = _budget_total(budget, total_parameters(leaves))
    sized = [r for r in rules[:-1] if {"pattern", "d", "k"} & set(overrides[r.path])]
    first = {p.path: next((r for r in rules if r.matches(p.path)), None) for p in plans}
    budgeted = [i for i, p in enumerate(plans) if first[p.path] not in sized]
    if not budgeted:
        raise ValueError("`budget`: every target's pattern size is set by `overrides`; nothing is left to choose.")
    fixed = sum(leaf_size(leaves[p]) for p in planned.extra)
    fixed += sum(_trainable(plans[i]) for i in range(len(plans)) if i not in set(budgeted))
    smallest = fixed + sum(_trainable(plans[i]) for i in budgeted)
    if smallest > limit:
        knob = "d=0" if pattern == "banded" else "k=1 per target"
        raise ValueError(f"`budget` allows {limit:,} trainable parameters but the smallest {pattern} pattern ({knob}) needs {smallest:,}; raise the budget or narrow `targets`.")
    budgeted_paths = {plans[i].path for i in budgeted}
    configs = [(config, {p.path for p in group}) for config, group in planned.groups if budgeted_paths & {p.path for p in group}]
    if len(configs) == 1 and configs[0][1] == budgeted_paths:
        config = configs[0][0]
        # One config adapts every budgeted target (no override changes their rank, seed, ...):
        # it carries the budget, solved by `SVFT.plans` as `SVFT(budget=N)` is.
        budgeted_config = dataclasses.replace(config, pattern=Named(pattern=pattern), budget=limit - fixed)
        rules = [dataclasses.replace(r, method=budgeted_config) if r.method == config else r for r in rules]
        planned = plan_adapt(params, rules, targets=targets, exclude=exclude, extra=extra, leaves=leaves)
        choice = budgeted_config.budget_choice(next(group for c, group in planned.groups if c == budgeted_config))
        choice.update(budget=limit, trainable=fixed + choice["trainable"])
        return Planned(planned.plans, planned.groups, planned.extra, choice)
    # Overrides that change a budgeted target's rank (seed, init, ...) make several configs share
    # one budget: the same solver, on their union.
    plans, choice = _solve_budget(plans, budgeted, fixed, limit, pattern)
    return Planned(plans, [(rules[-1].method, plans)], planned.extra, choice)


def _trainable(plan) -> int:
    """Trainable scalars of one SVFT plan: M's entries (and the reference init's gate) per layer."""
    return plan.layers * (plan.entries + (plan.init == "reference"))


def apply(
    params,
    pattern: str = "plain",
    *,
    d: int | None = None,
    k: int | None = None,
    rank: int | None = None,
    targets: str | None = None,
    exclude: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    extra: str | None = None,
    seed: int = 0,
    factor_dtype=jnp.float32,
    init: str = "zeros",
    svd_dtype: str = "float32",
    keep_base: bool = True,
    svd_backend: str = "auto",
    factors: Mapping | MutableMapping | None = None,
    svd_batch: int = 16,
    progress: bool = False,
    budget: int | float | None = None,
    mesh=None,
    fsdp: bool = False,
):
    """Replace target kernels by SVFT nodes: W = W0 + U M Vᵀ with M sparse on a pattern Ω.

    SVFT (Lingam et al., NeurIPS 2024, arXiv:2405.19597), §3.

    Args:
      params: any parameter pytree (Flax linen `params`, NNX state or pure dict, HF `model.params`).
      pattern: "plain" (diagonal), "banded" (|i − j| ≤ d), "random" (k seeded positions) or
        "topk" (k largest |u_iᵀ v_j|), or any name added with `register_pattern`.
      d: band half-width for "banded"; for random/top-k without `k`, the budget of the d-band.
      k: number of trainable entries per target for random/top-k.
      rank: singular triplets kept (None: r = min(d1, d2)). With rank < r, W0 stays frozen
        beside U_r, V_r, so M = 0 still gives W0 exactly.
      targets: regex matched in full against '/'-joined paths (e.g. '.*(query|value)/kernel');
        None picks every 2-D (or N-D) 'kernel' outside embeddings, norms, biases and heads.
      exclude: regex of paths never adapted (must match some parameter).
      overrides: {regex: {option: value}}; the first regex that matches a target's path
        overrides `pattern`, `d`, `k`, `rank`, `seed`, `init`, `factor_dtype`, `keep_base` or
        `layout` for it. Every regex must match a target.
      extra: regex of leaves trained in full beside the adapters (a new head, e.g.
        'classifier/.*'); they are marked `Trainable` in the result, so `split`, `optimizer`,
        `summary` and `save_adapter` need not be told again.
      seed: seeds the random pattern and init="reference" (with a checksum of each path).
      factor_dtype: dtype of the stored U, s, V (M is always float32).
      init: "zeros" (M = 0) or "reference" (the authors' Kaiming-normal m · sigmoid(gate)).
      svd_dtype: "float32" or "float64".
      keep_base: store W0 in the node (exact W0 at M = 0, needed by factored execution).
      svd_backend: "auto" (LAPACK on a CPU host, XLA on an accelerator), "jax", "numpy" or
        "randomized" (truncated rank only). The resolved back-end is recorded in each node, so
        an adapter file reloads with the routine that made its factors.
      factors: a factor store — a Mapping from `svft_jax.checkpoint.factor_key`-style keys to
        (u, s, v) — read before computing an SVD and, if mutable, written after; or the path
        (str or os.PathLike) of a factor cache file or folder, read with
        `svft_jax.checkpoint.load_factor_cache`. Every entry read is checked against its kernel
        (shapes, rank, dtype, and that it is this kernel's SVD to the SVD's tolerance) and a
        wrong one is refused, naming the target and the store. With a `mesh`, each process
        writes the factors it computed.
      svd_batch: how many same-shaped matrices one batched SVD call takes (with a `mesh`, per
        device).
      progress: show a progress bar over SVD batches.
      budget: pick the pattern size instead of `d`/`k`: a fraction of all parameters (float in
        (0, 1]) or an absolute count (int) of trainable scalars (adapters, reference gates and
        `extra` leaves). "banded": one d for every target, the largest whose total fits;
        "random"/"topk": k proportional to each target's rank, k = ⌊K·r/r_max⌋ with the largest
        K that fits. Targets whose pattern/d/k an override sets keep it. `svft_jax.plan`
        reports the choice.
      mesh: a `jax.sharding.Mesh`: the SVDs are split over its devices (and processes) — each
        device factorises its share of every batch of same-shaped matrices, from kernels that
        may be sharded or non-addressable — and the factors come back as global arrays
        replicated over the mesh (or FSDP-sharded with `fsdp=True`, as
        `svft_jax.distributed.shard_params`).
      fsdp: with `mesh`, split each factor over the mesh's "model" axis (its largest divisible
        axis) instead of replicating it.
    Returns:
      `params` with each target leaf replaced by an `SVFTNode` (and `extra` leaves marked).
    Raises:
      ValueError/TypeError naming the parameter path, before any SVD runs.
    """
    if isinstance(svd_batch, bool) or not isinstance(svd_batch, int) or svd_batch < 1:
        raise ValueError(f"`svd_batch` must be a positive int, got {svd_batch!r}.")
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    fsdp = check_bool(fsdp, "fsdp")
    progress = check_bool(progress, "progress")
    if fsdp and mesh is None:
        raise ValueError("`fsdp=True` shards the factors over a mesh; pass mesh= too.")
    if factors is not None and not isinstance(factors, Mapping):
        from svft_jax.checkpoint.cache import (
            as_factor_store,  # a path: read as load_adapter reads it
        )

        factors = as_factor_store(factors, "apply")
    leaves = flatten_by_path(params)
    planned = make_plans(params, pattern, d=d, k=k, rank=rank, targets=targets, exclude=exclude, overrides=overrides,
                         extra=extra, seed=seed, factor_dtype=factor_dtype, init=init, svd_dtype=svd_dtype,
                         keep_base=keep_base, svd_backend=svd_backend, budget=budget, leaves=leaves)
    return build(params, planned, extra=extra, leaves=leaves, factors=factors, batch=svd_batch, progress=progress,
                 mesh=mesh, fsdp=fsdp)


SVFTNode.plan_options = staticmethod(make_plans)  # `svft_jax.plan(params, method="svft", ...)`
