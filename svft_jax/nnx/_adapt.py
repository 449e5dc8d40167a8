"""`adapt`: SVFT (or LoRA/DoRA/VeRA) inside a live NNX model, the way qwix adds LoRA.

1. One run of the model on the user's dummy inputs, traced to a jaxpr with every state leaf as
   an input; each ≥ 2-D float `nnx.Param` is followed to the `dot_general`s it takes part in
   (`_discover.py`), which give its (stack, in, out) axes. Nothing is declared or guessed.
2. The library's typed rules (`svft_jax.Rule`, first match wins) pick targets and methods; the
   nodes are built by the library's one generic verb (`svft_jax.core`'s plan and build: one
   batched SVD for all SVFT targets), with each weight's layout read from its op.
3. Each node's arrays become variables on the module that owns the weight (`_variables.py`):
   trainable ones `nnx.LoRAParam`s, frozen ones plain variables; the weight is untouched.
4. The model's class becomes a subclass whose call method runs the original one through
   `svft_jax.wrap`'s interpreter: each adapted weight's matmul runs its strategy (the cost
   model's pick among rebuild, factored x W0ᵀ + (x V)(U M)ᵀ and spectral ((x V)(Σ + M)ᵀ) Uᵀ),
   so W is not formed where that is cheaper. Mutable state (BatchNorm statistics, RNG counts)
   is written back as `nnx.jit` would.

Why not qwix's interception: see the package docstring (`svft_jax/nnx/__init__.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from svft_jax._paths import path_to_str
from svft_jax.core._adapt import build, plan_adapt
from svft_jax.core._protocol import is_node
from svft_jax.core._rules import Rule, as_rules
from svft_jax.core._targets import DEFAULT_EXCLUDED_COMPONENT
from svft_jax.core.layout import KernelLayout, resolve_layout
from svft_jax.nnx import _discover, _variables

# ---- the report -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted weight: path, shape, the layout its matmul gave, method, strategy, rule."""

    path: str
    shape: tuple[int, ...]
    layout: KernelLayout
    method: str
    strategy: str
    rule: int
    trainable: int


@dataclasses.dataclass(frozen=True)
class LeftOut:
    """A ≥ 2-D float weight that is not adapted, and why."""

    path: str
    shape: tuple[int, ...]
    reason: str
    matmul: bool  # whether it feeds a matmul (the default targets' kind of weight)


@dataclasses.dataclass(frozen=True)
class Report:
    """What `adapt` did: the adapted weights and every ≥ 2-D float weight it left out."""

    targets: tuple[Target, ...]
    left_out: tuple[LeftOut, ...]

    def __str__(self) -> str:
        lines = [f"adapted weights: {len(self.targets)} (trainable values: {sum(t.trainable for t in self.targets):,})"]
        for t in self.targets:
            layout = t.layout
            axes = f"in {layout.in_axes} → out {layout.out_axes}" + (f", {layout.stack_ndim} stacked" if layout.stack_ndim else "")
            lines.append(f"  {t.path} {t.shape}: {t.method}, W {layout.d1}×{layout.d2} ({axes}), "
                         f"{t.trainable:,} trainable, strategy {t.strategy}, rule {t.rule}")
        matmul = [x for x in self.left_out if x.matmul]
        other = [x for x in self.left_out if not x.matmul]
        lines.append(f"matmul weights left out: {len(matmul)}")
        lines += [f"  {x.path} {x.shape}: {x.reason}" for x in matmul]
        if other:
            lines.append(f"other ≥2-D float weights (no matmul use to adapt): {len(other)}")
            lines += [f"  {x.path} {x.shape}: {x.reason}" for x in other]
        return "\n".join(lines)


# ---- reading the model ----------------------------------------------------------------------


def _canonical(path: tuple) -> str:
    """A state leaf's path without the trailing '.value' of its Variable: 'mlp/up/kernel'."""
    keys = path[:-1] if path and getattr(path[-1], "name", None) == "value" else path
    return path_to_str(keys)


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray)


@dataclasses.dataclass
class _Weight:
    path: str
    variable: object
    module: object
    attribute: str
    uses: list

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(_variables.variable_value(self.variable)))

    @property
    def matmul_uses(self) -> list:
        return [u for u in self.uses if u.is_matmul]

    @property
    def other_uses(self) -> list:
        return [u for u in self.uses if not u.is_matmul]

    @property
    def layouts(self) -> dict:
        """{(stack, in, out): first use with it}."""
        found = {}
        for use in self.matmul_uses:
            found.setdefault(use.layout_key, use)
        return found

    def layout(self) -> KernelLayout:
        ((stack, ins, outs),) = self.layouts
        dtype = jnp.dtype(_variables.variable_value(self.variable).dtype).name
        return KernelLayout(self.shape, dtype, len(stack), ins, outs)


def _split_leaves(model):
    """(graphdef, treedef, [(canonical path, leaf value)]) of `model`'s whole state."""
    graphdef, state = nnx.split(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    return graphdef, treedef, [(_canonical(p), leaf) for p, leaf in flat]


def _candidates(model) -> dict[str, _Weight]:
    """Every ≥ 2-D float `nnx.Param` (adapter variables excluded) that is a direct attribute of
    a module, by path."""
    found = {}
    for parts, module in nnx.iter_modules(model):
        prefix = "/".join(map(str, parts))
        for attribute, value in vars(module).items():
            if not isinstance(value, nnx.Param) or isinstance(value, nnx.LoRAParam):
                continue
            array = _variables.variable_value(value)
            if not (_is_array(array) and array.ndim >= 2 and jnp.issubdtype(array.dtype, jnp.floating)):
                continue
            path = f"{prefix}/{attribute}" if prefix else attribute
            found.setdefault(path, _Weight(path, value, module, attribute, []))
    return found


def _trace_uses(model, call_method: str, args, kwargs, weights: dict[str, _Weight]) -> None:
    """Run `model.<call_method>(*args, **kwargs)` abstractly once and record each weight's uses."""
    graphdef, treedef, leaves = _split_leaves(model)
    dynamic = [i for i, (_, leaf) in enumerate(leaves) if _is_array(leaf)]
    call = getattr(_original_type(model), call_method)

    def run(*values):
        filled = [leaf for _, leaf in leaves]
        for i, value in zip(dynamic, values, strict=True):
            filled[i] = value
        return call(nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, filled)), *args, **kwargs)

    closed = jax.make_jaxpr(run)(*[leaves[i][1] for i in dynamic])
    position = {leaves[i][0]: n for n, i in enumerate(dynamic)}
    uses = _discover.find_uses(closed, {position[p]: p for p in weights if p in position})
    for path, weight in weights.items():
        weight.uses = uses.get(path, [])


def _original_type(model) -> type:
    return getattr(type(model), "_svft_original_type", type(model))


def _is_default_target(path: str) -> bool:
    return not any(DEFAULT_EXCLUDED_COMPONENT.fullmatch(c) for c in path.split("/"))


def _excluded_component(path: str) -> str:
    return next(c for c in path.split("/") if DEFAULT_EXCLUDED_COMPONENT.fullmatch(c))


# ---- choosing targets -----------------------------------------------------------------------


def _select(weights: dict[str, _Weight], rules: tuple[Rule, ...]):
    """({path: (rule index, rule)} adapted, [LeftOut]) or ValueError naming the path and the fix."""
    adaptable = {p: w for p, w in weights.items() if w.uses and not w.other_uses}
    matched: dict[int, list[str]] = {i: [] for i in range(len(rules))}
    chosen, left = {}, []
    for path, weight in adaptable.items():
        index = next((i for i, rule in enumerate(rules) if _rule_takes(rule, path)), None)
        if index is None:
            if not _is_default_target(path) and any(r.path is None for r in rules):
                reason = (f"the default targets leave out embeddings, norms and heads ({_excluded_component(path)!r}); "
                          f"name it in a Rule(path=...) to adapt it")
            else:
                reason = "matched by no rule"
            left.append(LeftOut(path, weight.shape, reason, True))
            continue
        matched[index].append(path)
        rule = rules[index]
        if rule.method is None:
            left.append(LeftOut(path, weight.shape, f"left out by rule {index} ({rule.where})", True))
            continue
        if len(weight.layouts) > 1:
            first, second = list(weight.layouts.values())[:2]
            raise ValueError(
                f"weight {path!r} {weight.shape} takes part in two different contractions — {first.describe()} and "
                f"{second.describe()} — so no one (stack, in, out) reading of it is the matrix W that both use. "
                f"Leave it out with Rule(path={re.escape(path)!r}, method=None) before rule {index}.")
        if rule.layout is not None:
            _check_declared_layout(path, weight, rule, index)
        chosen[path] = (index, rule)
    for path, weight in weights.items():
        if path in adaptable:
            continue
        if not weight.uses:
            reason = "not read by the call on the dummy inputs"
        else:
            reason = "used outside a matmul: " + "; ".join(u.describe() for u in weight.other_uses[:2])
        left.append(LeftOut(path, weight.shape, reason, False))
    for index, rule in enumerate(rules):
        if matched[index]:
            continue
        explicit = [p for p in weights if rule.path is not None and rule.matches(p)]
        taken = [p for p in explicit if p in adaptable]
        if taken:
            why = f"every matmul weight it matches is taken by an earlier rule (e.g. {taken[0]!r})"
        elif explicit:
            other = weights[explicit[0]]
            use = other.other_uses[0].describe() if other.other_uses else "not read by the call"
            why = f"it matches only weights that are not matmul weights (e.g. {explicit[0]!r}: {use})"
        elif rule.path is None:
            why = "the model has no matmul weight outside embeddings, norms and heads"
        else:
            why = "it matches no weight of the model"
        sample = ", ".join(repr(p) for p in list(adaptable)[:6]) or "none"
        raise ValueError(f"rule {index} ({rule.where}) matches no weight: {why}. Paths are '/'-joined weight "
                         f"paths matched in full; the model's matmul weights are [{sample}{', ...' if len(adaptable) > 6 else ''}].")
    return chosen, left


def _check_strategies(rules) -> None:
    """Every rule's strategy is a registered one (None: "auto", the cost model's pick)."""
    from svft_jax.strategies import get_strategy

    for rule in rules:
        if rule.strategy is not None:
            try:
                get_strategy(rule.strategy)
            except (KeyError, ValueError) as err:
                raise ValueError(f"{rule.where}: {err}") from err


def _rule_takes(rule: Rule, path: str) -> bool:
    """path=None takes the default targets; a regex takes any matmul weight it matches in full."""
    return _is_default_target(path) if rule.path is None else rule.matches(path)


def _op_layout(weight) -> dict:
    layout = weight.layout()
    return {"stack_ndim": layout.stack_ndim, "in_axes": tuple(layout.in_axes), "out_axes": tuple(layout.out_axes)}


def _check_declared_layout(path: str, weight, rule: Rule, index: int) -> None:
    """A rule's `layout` is a check here: the layout its matmul reads must be the declared one."""
    value = _variables.variable_value(weight.variable)
    try:
        declared = resolve_layout(value.shape, jnp.dtype(value.dtype).name, rule.layout, path=path)
    except (ValueError, TypeError) as err:
        raise type(err)(f"weight {path!r}: rule {index} ({rule.where}): {err}") from err
    want = {"stack_ndim": declared.stack_ndim, "in_axes": tuple(declared.in_axes), "out_axes": tuple(declared.out_axes)}
    found = _op_layout(weight)
    if want != found:
        raise ValueError(f"weight {path!r}: rule {index} expects layout {want}, but its matmul "
                         f"({weight.matmul_uses[0].describe()}) reads {found}; fix or drop the rule's layout.")


def _plan(weights: dict[str, _Weight], chosen: dict):
    """(values, planned): the library's generic plans of the chosen weights, each with its rule's
    method and the layout read from its op (no array built; what `size` reports). A method's
    whole-set option (SVFT's `budget`) sees every weight its config adapts."""
    values = {p: _variables.variable_value(weights[p].variable) for p in chosen}
    rules = [Rule(path=re.escape(p), method=rule.method, layout=_op_layout(weights[p]), label=f"weight {p!r}")
             for p, (_, rule) in chosen.items()]
    planned = plan_adapt(values, rules, targets="|".join(re.escape(p) for p in values))
    for plan in planned.plans:
        _check_layer_axes(plan)
    return values, planned


def _build(weights: dict[str, _Weight], chosen: dict, factors) -> dict:
    """{path: node}: `_plan`'s plans built (one batched SVD for every SVFT target)."""
    values, planned = _plan(weights, chosen)
    nodes = build(values, planned, **({} if factors is None else {"factors": factors}))
    return {path: nodes[path] for path in chosen}


def _check_layer_axes(plan) -> None:
    """A stacked weight (inside nnx.scan/vmap) needs every array of its node to lead with the
    layer axes, so the transform can slice it per layer; a buffer shared across layers cannot."""
    stack = tuple(plan.layout.stack_shape)
    if not stack:
        return
    for field, spec in plan.arrays().items():
        if spec.role != "base" and (spec.shared is not None or tuple(spec.shape[: len(stack)]) != stack):
            raise ValueError(f"weight {plan.path!r} is a stack of {stack} matrices, but its {plan.describe()} array "
                             f"{field!r} {tuple(spec.shape)} has no layer axis (it is shared across layers), so an "
                             f"nnx.scan/vmap over this module could not slice it. Use another method for stacked weights.")


# ---- the adapted class ----------------------------------------------------------------------

# Variables the call may change (BatchNorm statistics, RNG counts, sown intermediates): written
# back after each call. Params (the weights, the adapters' trainable arrays) and frozen factors
# are never changed by a forward pass.
_MUTABLE = nnx.All(nnx.Not(nnx.Param), nnx.Not(_variables.AdapterFactor))


def _run(self, call, args, kwargs):
    """The adapted call: the original `call` through `svft_jax.wrap`, adapter nodes in place of
    their weights; mutable state written back."""
    from svft_jax.strategies import wrap

    slots = _variables.slots(self)
    if not slots:
        return call(self, *args, **kwargs)
    graphdef, treedef, leaves = _split_leaves(self)
    index = {path: i for i, (path, _) in enumerate(leaves)}
    nodes = {path: slot.node(leaves[index[path]][1]) for path, slot in slots.items()}
    rest = [None if path in slots else leaf for path, leaf in leaves]

    def apply(kernels, rest, args, kwargs):
        filled = list(rest)
        for path, kernel in kernels.items():
            filled[index[path]] = kernel
        model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, filled))
        return call(model, *args, **kwargs), nnx.state(model, _MUTABLE)

    overrides = {re.escape(path): slot.strategy for path, slot in slots.items() if slot.strategy != "auto"}
    wrapped = wrap(apply, "auto", overrides=overrides)
    out, changed = wrapped(nodes, rest, args, kwargs)
    if jax.tree_util.tree_leaves(changed):
        nnx.update(self, changed)
    type(self)._svft_last_plan = wrapped.last_plan
    return out


def _adapted_class(cls: type, call_method: str, report: Report) -> type:
    original = getattr(cls, call_method)

    @functools.wraps(original)
    def adapted_call(self, *args, **kwargs):
        return _run(self, original, args, kwargs)

    namespace = {call_method: adapted_call, "_svft_original_type": cls, "_svft_call_method": call_method,
                 "_svft_report": report, "_svft_last_plan": {}, "__module__": cls.__module__,
                 "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
    # keep the original's NNX pytree mode (Tunix models are pytree=False; a subclass would
    # otherwise get flax's default)
    keywords = {"pytree": cls._pytree__is_pytree} if hasattr(cls, "_pytree__is_pytree") else {}
    return types.new_class(cls.__name__, (cls,), keywords, lambda ns: ns.update(namespace))


def _check_model(model, where: str) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(f"{where} takes an nnx.Module, got {type(model).__name__}; for linen or raw parameter pytrees use svft_jax.apply and svft_jax.wrap.")


def is_adapted(model) -> bool:
    """Whether `model` was returned by `adapt` (and not merged since)."""
    return hasattr(type(model), "_svft_original_type")


# ---- the public verbs -----------------------------------------------------------------------


def adapt(model, rules, *model_inputs, call_method: str = "__call__", factors=None, **model_inputs_kwargs):
    """Adapt an NNX model in place of its weights, after one run on dummy inputs (qwix-style).

    Returns an adapted *clone* (the given model is not modified, as qwix's `quantize_model`):
    every targeted weight's module gains the adapter's variables — trainable arrays as plain
    `nnx.LoRAParam`s with adapter metadata (`AdapterParam` selects them), frozen factors as
    plain variables (`AdapterFactor`) — and
    the model's class becomes a subclass whose `call_method` runs each adapted matmul with its
    execution strategy. `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`, `nnx.state(model,
    nnx.LoRAParam)`, `nnx.jit`, `nnx.grad` and Tunix's `PeftTrainer` work on it unchanged.
    Only `call_method` of the root module runs the adapters (as qwix): call the model, not a
    submodule.

    Targets: every ≥ 2-D float `nnx.Param` whose uses in the call on `model_inputs` are all
    matmuls (`jnp.einsum`, `jnp.dot`, `@`, `lax.dot_general`: flax `nnx.Linear`, `nnx.Einsum`,
    `nnx.LinearGeneral`, `nnx.MultiHeadAttention`, Tunix's `Einsum` weights `w`), each read as
    W (out × in, per stacked layer) from the contraction it takes part in. The rules pick
    among them, first match wins; `Rule(path=None)` (or a bare method config) means the
    default targets: all of them except embeddings, norms and output heads.

    Args:
      model: an `nnx.Module` (not already adapted).
      rules: a method config (`SVFT(pattern=Banded(d=2))`, `LoRA(rank=8)`, `DoRA(...)`,
        `VeRA(...)`) for the default targets, a `Rule`, or a list of `Rule`s.
      *model_inputs, **model_inputs_kwargs: arguments of one call of `call_method` (only their
        shapes and dtypes matter; the call is traced, not run).
      call_method: the method that runs the model (default `__call__`).
      factors: a factor store for SVFT's SVDs (`svft_jax.checkpoint.load_factor_cache(path)`).
    Returns:
      The adapted clone. `summary(model)` lists each adapted weight (layout from its matmul,
      method, strategy) and every ≥ 2-D float weight left out, with why.
    Raises:
      ValueError, before any SVD, naming the weight and the fix: a rule that matches no
      weight; a targeted weight used in two different contractions (both are named) or whose
      matmul disagrees with a rule's `layout`; VeRA on stacked weights.
    """
    _check_model(model, "svft_jax.nnx.adapt")
    model = nnx.clone(model)
    weights, chosen, left = _targets(model, rules, call_method, model_inputs, model_inputs_kwargs, "svft_jax.nnx.adapt")
    nodes = _build(weights, chosen, factors)
    shared: dict = {}
    targets = []
    for path, node in nodes.items():
        index, rule = chosen[path]
        weight = weights[path]
        strategy = rule.strategy or "auto"
        _variables.install(weight.module, weight.attribute, node, strategy, shared)
        targets.append(Target(path, weight.shape, node.layout, node.describe(), strategy, index, node.num_trainable))
    report = Report(tuple(targets), tuple(left))
    model.__class__ = _adapted_class(type(model), call_method, report)
    return model


def _targets(model, rules, call_method: str, model_inputs, model_inputs_kwargs, where: str):
    """(weights, chosen, left out): `adapt`'s reading of `model` (one traced call) and its rules'
    choice of targets, validated; `model` is not changed."""
    _check_model(model, where)
    if is_adapted(model):
        raise ValueError("this model is already adapted; merge it first (svft_jax.nnx.merge) or adapt the original model.")
    rules = as_rules(rules)
    _check_strategies(rules)
    if not hasattr(type(model), call_method):
        raise ValueError(f"{type(model).__name__} has no method {call_method!r} (call_method=).")
    weights = _candidates(model)
    _trace_uses(model, call_method, model_inputs, model_inputs_kwargs, weights)
    chosen, left = _select(weights, rules)
    if not chosen:
        raise ValueError("the rules adapt no weight (every matched weight is left out by a rule with method=None); "
                         "give some rule a method.")
    return weights, chosen, left


def size(model, rules, *model_inputs, tokens: int = 1024, print_fn=None, call_method: str = "__call__",
         **model_inputs_kwargs):
    """What `adapt(model, rules, *model_inputs)` would build, without building it: no SVD runs and
    `model` is not modified (the `svft_jax.size` report of a pytree, for an NNX model).

    Each weight's layout is read from its op, as `adapt` reads it (one traced call on the dummy
    inputs), and the plans are the very plans `adapt` builds from, so the counts agree.

    Args:
      model, rules, *model_inputs, call_method, **model_inputs_kwargs: as `adapt` takes them.
      tokens: T, tokens per call, for the per-token training FLOPs.
      print_fn: e.g. `print` to print the table.
    Returns:
      A `svft_jax.SizeReport`: `.rows` per target (path, W's shape, method, rank, entries,
      trainable, factor / trainable / W0 bytes, FLOPs per token per strategy), `.totals`
      (`total`: the model's `nnx.Param` scalars), `.plans`, `.choice` (SVFT's budget) and
      `str(report)`, the table.
    Raises:
      ValueError/TypeError as `adapt` would, before anything is computed.
    """
    from svft_jax.core._size import _check_tokens, _finish
    from svft_jax.core._size import report as size_report

    _check_tokens(tokens)
    weights, chosen, _ = _targets(model, rules, call_method, model_inputs, model_inputs_kwargs, "svft_jax.nnx.size")
    _, planned = _plan(weights, chosen)
    leaves = {_canonical(p): x for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
    return _finish(size_report(planned, leaves, tokens), print_fn)


def summary(model) -> str:
    """What `adapt` did to `model`: adapted weights (path, method, W's shape and the axes its
    matmul gave, trainable count, strategy — and the strategies the last call ran) and every
    ≥ 2-D float weight left out, with why."""
    _check_model(model, "svft_jax.nnx.summary")
    if not is_adapted(model):
        raise ValueError("this model is not adapted (svft_jax.nnx.adapt returns the adapted model).")
    text = str(type(model)._svft_report)
    plan = type(model)._svft_last_plan
    if plan:
        ran = {}
        for path, names in plan.items():
            ran.setdefault("+".join(names), []).append(path)
        text += "\nstrategies in the last call: " + "; ".join(f"{name}: {len(paths)}" for name, paths in ran.items())
    return text


def report(model) -> Report:
    """The `Report` behind `summary` (adapted `targets`, `left_out` weights)."""
    _check_model(model, "svft_jax.nnx.report")
    if not is_adapted(model):
        raise ValueError("this model is not adapted (svft_jax.nnx.adapt returns the adapted model).")
    return type(model)._svft_report


def merge(model):
    """Merge every adapter into its weight, in place, and drop the adapter variables.

    Each adapted weight becomes W0 + ΔW in its own layout and dtype (the node's `materialize`);
    the model's class goes back to the original, so it is a plain model again.

    Returns:
      `model` itself (merged in place).
    """
    _check_model(model, "svft_jax.nnx.merge")
    for slot in _variables.slots(model).values():
        weight = getattr(slot.module, slot.weight)
        kernel = slot.node().materialize()
        if hasattr(weight, "set_value"):
            weight.set_value(kernel)
        else:  # pragma: no cover - older flax
            weight.value = kernel
        _variables.remove(slot)
    if is_adapted(model):
        model.__class__ = type(model)._svft_original_type
    return model


def params(model) -> dict:
    """The model's parameters as a plain nested dict (`nnx.Param`s, adapter variables excluded):
    the base pytree that `svft_jax.apply` and `svft_jax.checkpoint.load_adapter` take."""
    _check_model(model, "svft_jax.nnx.params")
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(_variables.AdapterParam)))
    return nnx.to_pure_dict(state)


def to_tree(model) -> dict:
    """The adapted model as the pytree API's adapted tree: `params(model)` with each adapted
    weight replaced by its adapter node. Works with `svft_jax.merge`, `summary`, `split` and
    `svft_jax.checkpoint.save_adapter`."""
    nodes = {path: slot.node() for path, slot in _variables.slots(model).items()}
    return jax.tree_util.tree_map_with_path(lambda p, x: nodes.get(path_to_str(p), x), params(model))


def from_tree(model, tree, *model_inputs, strategy: str = "auto", call_method: str = "__call__", **model_inputs_kwargs):
    """Install the adapter nodes of a pytree-API tree (`svft_jax.apply`, a baseline's `apply`,
    `svft_jax.checkpoint.load_adapter`) on a clone of `model`, matched by path.

    Each node must be for a weight of `model` that feeds a matmul (checked by one run on the
    dummy inputs, as `adapt`), with the same (stack, in, out) axes as that matmul and the same
    base weight (bit-identical); the model then runs it as `adapt`'s models do.

    Args:
      model: the base `nnx.Module` (not adapted).
      tree: a pytree holding adapter nodes at weight paths ('.../kernel' or '.../kernel/value').
      strategy: the execution strategy of every installed node.
    Returns:
      The adapted clone.
    Raises:
      ValueError naming the path: no such weight, not a matmul weight, another layout, or
      another base weight.
    """
    from svft_jax.strategies import get_strategy

    _check_model(model, "svft_jax.nnx.from_tree")
    if is_adapted(model):
        raise ValueError("this model is already adapted; install adapters on the base model.")
    get_strategy(strategy)
    nodes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
        if is_node(leaf):
            nodes[_canonical(path)] = leaf
    if not nodes:
        raise ValueError("from_tree: `tree` holds no adapter node.")
    model = nnx.clone(model)
    weights = _candidates(model)
    missing = [p for p in nodes if p not in weights]
    if missing:
        raise ValueError(f"from_tree: the model has no ≥ 2-D float weight {missing[0]!r}; its weights are {list(weights)[:6]}.")
    _trace_uses(model, call_method, model_inputs, model_inputs_kwargs, weights)
    targets = []
    shared: dict = {}
    for path, node in nodes.items():
        weight = weights[path]
        if not weight.uses or weight.other_uses or len(weight.layouts) != 1:
            what = "is not read by the call" if not weight.uses else (
                f"is used outside a matmul ({weight.other_uses[0].describe()})" if weight.other_uses
                else "takes part in two different contractions")
            raise ValueError(f"from_tree: weight {path!r} {what}, so its adapter cannot run at its matmul.")
        layout = weight.layout()
        if (node.layout.stack_ndim, node.layout.in_axes, node.layout.out_axes) != (layout.stack_ndim, layout.in_axes, layout.out_axes):
            raise ValueError(f"from_tree: the adapter of {path!r} reads the weight with stack {node.layout.stack_ndim}, "
                             f"in {node.layout.in_axes}, out {node.layout.out_axes}, but its matmul "
                             f"({weight.matmul_uses[0].describe()}) gives stack {layout.stack_ndim}, in {layout.in_axes}, "
                             f"out {layout.out_axes}.")
        base = getattr(node, "base", None)
        value = _variables.variable_value(weight.variable)
        if base is not None and not np.array_equal(np.asarray(base), np.asarray(value)):
            raise ValueError(f"from_tree: the adapter of {path!r} was made on another base weight than the model's.")
        _variables.install(weight.module, weight.attribute, node, strategy, shared)
        targets.append(Target(path, weight.shape, node.layout, node.describe(), strategy, -1, node.num_trainable))
    left = tuple(LeftOut(p, w.shape, "not in the installed tree", bool(w.uses and not w.other_uses))
                 for p, w in weights.items() if p not in nodes)
    model.__class__ = _adapted_class(type(model), call_method, Report(tuple(targets), left))
    return model


def save_adapter(path, model, **kwargs):
    """`svft_jax.checkpoint.save_adapter(path, to_tree(model), **kwargs)`: the existing adapter
    file format, targets named by their weight paths."""
    from svft_jax.checkpoint import save_adapter as save

    return save(path, to_tree(model), **kwargs)


def load_adapter(model, path, *model_inputs, strategy: str = "auto", call_method: str = "__call__",
                 factors=None, **model_inputs_kwargs):
    """An adapted clone of the base `model` with the adapter file at `path` installed: the file
    is verified and its nodes re-created on `params(model)` by `svft_jax.checkpoint.load_adapter`
    (any file of the existing format, whether trained through this path or the pytree API),
    then installed by `from_tree` (layouts checked against the model's matmuls)."""
    from svft_jax.checkpoint import load_adapter as load
    from svft_jax.core._protocol import is_marker

    _check_model(model, "svft_jax.nnx.load_adapter")
    tree = load(path, params(model), factors=factors)
    extras = [path_to_str(p) for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_marker)[0] if is_marker(x)]
    if extras:
        raise ValueError(f"adapter file {str(path)!r} also trains leaves in full ({extras[:3]}); the NNX path installs "
                         f"adapters only. Load it with svft_jax.checkpoint.load_adapter on params(model) instead.")
    return from_tree(model, tree, *model_inputs, strategy=strategy, call_method=call_method, **model_inputs_kwargs)
