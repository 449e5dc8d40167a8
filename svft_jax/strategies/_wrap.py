"""`wrap(apply_fn)`: run a model on the adapted tree, each target with its execution strategy.

Design: a jaxpr interpreter (as lorax/qax do), not Flax method interception. Reasons:
  * it works on any JAX function over raw parameter pytrees — HF Flax models (params as a
    keyword), `module.apply`, linen, NNX `merge`d state, plain jnp code — with no model edit
    and no knowledge of which Flax class (Dense, DenseGeneral, GPT-2's Conv1D, ...) holds a
    kernel; interception would need one re-implementation per layer class and sees nothing
    that is not a linen module method;
  * the decision is made where the kernel meets the activation (`dot_general`), so the token
    count T the cost model needs is known exactly, per call;
  * it follows `scan` (stacked layers are sliced into per-layer nodes), remat/`checkpoint`,
    `cond`, `while`, custom_jvp/custom_vjp bodies, per-layer indexing and layer-batched dots
    (see `interpreter.py`); any other use of
    a kernel gets the dense merged kernel, so the result is always the merged model's, and
    that fallback is reported (`FallbackWarning`; `strict=True` raises).
Cost: the model is traced twice per compilation (once to a jaxpr, once through the
interpreter); under `jit` that is compile time only.

The plan (which strategy ran each target) is a function of the call's static structure —
the adapted tree's node metadata, the shapes and dtypes of the array arguments and the static
arguments — so it is stored per structure and read back with `wrapped.plan(*args, **kwargs)`,
which is correct whatever `jax.jit` has cached (it traces abstractly when that structure has
not been seen).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax

from svft_jax._paths import compile_regex, path_to_str
from svft_jax.core._merge import merge, strip_markers
from svft_jax.core._protocol import is_node
from svft_jax.core._rules import Rule, as_rules
from svft_jax.strategies.interpreter import CallContext, KernelProxy, interpret_top, is_array
from svft_jax.strategies.registry import get_strategy


class _Placeholder:
    """Stands for one node's kernel while the model is traced to a jaxpr."""

    def __init__(self, node, path: str, strategy: str):
        self.node, self.path, self.strategy = node, path, strategy
        layout = node.meta.layout
        self.aval = jax.ShapeDtypeStruct(layout.shape, layout.dtype)


def _aval(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=getattr(jax.typeof(x), "weak_type", False))


def _leaf_key(leaf):
    """What of one argument leaf the plan can depend on: an array's shape and dtype, or a
    static value itself."""
    if is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct):
        return ("array", tuple(leaf.shape), str(leaf.dtype))
    try:
        hash(leaf)
    except TypeError:
        return ("object", type(leaf).__qualname__, id(leaf))
    return ("static", type(leaf).__qualname__, leaf)


def _has_node(tree) -> bool:
    return any(is_node(leaf) for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_node))


def _is_hf_model(fn) -> bool:
    """A transformers Flax model object (its __call__ takes params as a keyword)."""
    return any(klass.__name__ == "FlaxPreTrainedModel" for klass in type(fn).__mro__)


class Wrapped:
    """The function `wrap` returns: `apply_fn`'s signature, the adapted tree in place of params.

    Attributes:
      plan(*args, **kwargs): {path: (strategy names that ran its uses, first-seen order)} for a
        call with these arguments' structure; "rebuild" means the dense merged kernel was used
        (chosen, or a reported fallback).
      last_plan: the plan, when every structure traced so far has the same one; a
        `RuntimeError` pointing to `plan(...)` when traced structures disagree (under a cached
        `jax.jit` the most recent *call* may not be the most recent *trace*).
    """

    def __init__(self, apply_fn, strategy, overrides, params_argnum, params_argname, strict):
        self._apply_fn = apply_fn
        self._default = strategy
        self._rules = overrides
        self._params_argnum = params_argnum
        self._params_argname = params_argname
        self._strict = strict
        self._plans: dict = {}
        self._checked_overrides: set = set()
        functools.update_wrapper(self, apply_fn, updated=())

    # ------------------------------------------------------------------ public
    def __call__(self, *args, **kwargs):
        return self._run(list(args), dict(kwargs))

    def plan(self, *args, **kwargs) -> dict:
        """The plan of a call with these arguments (arrays or `jax.ShapeDtypeStruct`s).

        Traces abstractly (no FLOPs) when this structure has not been traced before.
        """
        args, kwargs = list(args), dict(kwargs)
        key = self._key(args, kwargs)
        if key not in self._plans:
            leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
            dynamic = [i for i, leaf in enumerate(leaves) if is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)]

            def call(*values):
                filled = list(leaves)
                for i, value in zip(dynamic, values, strict=True):
                    filled[i] = value
                call_args, call_kwargs = jax.tree_util.tree_unflatten(tree, filled)
                return self._run(list(call_args), dict(call_kwargs))

            jax.eval_shape(call, *[leaves[i] for i in dynamic])
        return dict(self._plans[key])

    @property
    def last_plan(self) -> dict:
        distinct = {tuple(sorted(plan.items())) for plan in self._plans.values()}
        if not distinct:
            return {}
        if len(distinct) > 1:
            raise RuntimeError(
                f"this wrapped function was traced for {len(self._plans)} call structures with "
                f"different plans, so `last_plan` cannot tell which one a cached jit call ran; "
                f"use `wrapped.plan(*args, **kwargs)` with the call's arguments.")
        return dict(next(iter(self._plans.values())))

    # ------------------------------------------------------------------ internals
    def _strategy_for(self, path: str) -> str:
        return next((rule.strategy for rule in self._rules if rule.matches(path)), self._default)

    def _adapted(self, args, kwargs):
        if self._params_argname is not None:
            if self._params_argname not in kwargs:
                raise TypeError(f"wrapped function expects the adapted tree as keyword {self._params_argname!r}; got keywords {sorted(kwargs)}.")
            tree = kwargs[self._params_argname]
        elif self._params_argnum >= len(args):
            raise TypeError(f"wrapped function expects the adapted tree as positional argument {self._params_argnum}, but got {len(args)} positional arguments (use params_argname= for keyword params).")
        else:
            tree = args[self._params_argnum]
        if not _has_node(tree):
            self._refuse_misplaced(args, kwargs)
        return tree

    def _refuse_misplaced(self, args, kwargs) -> None:
        """The designated argument has no adapter node: if another one has, say where (the
        model would otherwise meet a node in its matmul and raise a raw TypeError)."""
        found = next((i for i, arg in enumerate(args) if _has_node(arg)), None)
        if found is not None:
            where, fix = f"positional argument {found}", f"params_argnum={found}"
        else:
            name = next((k for k, v in kwargs.items() if _has_node(v)), None)
            if name is None:
                return  # plain parameters: they pass through unchanged
            where, fix = f"keyword {name!r}", f"params_argname={name!r}"
        if self._params_argname is not None:
            points = f"params_argname={self._params_argname!r} points to keyword {self._params_argname!r}"
            fix += " (and no params_argname)" if found is not None else ""
        else:
            points = f"params_argnum={self._params_argnum} points to positional argument {self._params_argnum}"
        raise TypeError(f"wrap: {points}, which holds no adapted kernel, but the adapted tree was passed as "
                        f"{where}; wrap the function with {fix}.")

    def _key(self, args, kwargs):
        self._adapted(args, kwargs)  # the same TypeError as a call, before any tracing
        leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
        return (tree, tuple(_leaf_key(leaf) for leaf in leaves))

    def _check_overrides(self, paths: list[str]) -> None:
        """Every `overrides` regex must match some adapted path (issue: a typo is silent)."""
        key = tuple(paths)
        if key in self._checked_overrides:
            return
        for rule in self._rules:
            if not any(rule.matches(p) for p in paths):
                shown = ", ".join(repr(p) for p in paths[:6]) + (", ..." if len(paths) > 6 else "")
                raise ValueError(
                    f"{rule.where} (strategy {rule.strategy!r}) matches no adapted "
                    f"kernel; the adapted paths are [{shown}]. Fix the regex (it must fully match "
                    f"a '/'-joined path) or remove it.")
        self._checked_overrides.add(key)

    def _run(self, args: list, kwargs: dict):
        key = self._key(args, kwargs)
        adapted = strip_markers(self._adapted(args, kwargs))  # arrays where `Trainable` marks a leaf
        flat, treedef = jax.tree_util.tree_flatten_with_path(adapted, is_leaf=is_node)
        placeholders = {}
        leaves = []
        for path, leaf in flat:
            if is_node(leaf):
                name = path_to_str(path)
                placeholders[name] = _Placeholder(leaf, name, self._strategy_for(name))
                leaves.append(placeholders[name])
            else:
                leaves.append(leaf)
        self._check_overrides(list(placeholders))
        if not placeholders or all(p.strategy == "rebuild" for p in placeholders.values()):
            # Nothing to interpret: merge once and call the model directly.
            self._plans[key] = {name: ("rebuild",) for name in placeholders}
            dense_args, dense_kwargs = self._replace(args, kwargs, merge(adapted))
            return self._apply_fn(*dense_args, **dense_kwargs)
        traced_tree = jax.tree_util.tree_unflatten(treedef, leaves)
        new_args, new_kwargs = self._replace(args, kwargs, traced_tree)

        all_leaves, call_tree = jax.tree_util.tree_flatten((new_args, new_kwargs))
        dynamic = [i for i, leaf in enumerate(all_leaves) if is_array(leaf) or isinstance(leaf, _Placeholder)]

        def flat_fn(*values):
            filled = list(all_leaves)
            for i, value in zip(dynamic, values, strict=True):
                filled[i] = value
            call_args, call_kwargs = jax.tree_util.tree_unflatten(call_tree, filled)
            return self._apply_fn(*call_args, **call_kwargs)

        avals = [all_leaves[i].aval if isinstance(all_leaves[i], _Placeholder) else _aval(all_leaves[i]) for i in dynamic]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)

        context = CallContext(strict=self._strict)
        values = []
        for i in dynamic:
            leaf = all_leaves[i]
            if isinstance(leaf, _Placeholder):
                context.plan.setdefault(leaf.path, [])
                values.append(KernelProxy(
                    leaf.node, leaf.path, get_strategy(leaf.strategy), tuple(range(len(leaf.aval.shape))),
                    leaf.aval.dtype, memo={}, strategy_name=leaf.strategy, context=context))
            else:
                values.append(leaf)
        outs = interpret_top(closed.jaxpr, closed.consts, values)
        self._plans[key] = {path: tuple(used) for path, used in context.plan.items()}
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    def _replace(self, args: list, kwargs: dict, tree):
        """(args, kwargs) with the adapted tree replaced by `tree`."""
        args, kwargs = list(args), dict(kwargs)
        if self._params_argname is not None:
            kwargs[self._params_argname] = tree
        else:
            args[self._params_argnum] = tree
        return args, kwargs


def wrap(
    apply_fn: Callable,
    strategy: str = "auto",
    *,
    overrides: Mapping[str, str] | None = None,
    rules: Sequence[Rule] | None = None,
    params_argnum: int | None = 0,
    params_argname: str | None = None,
    strict: bool = False,
) -> Wrapped:
    """A function with `apply_fn`'s signature that takes the adapted tree in place of params.

    Each adapted kernel is executed with a strategy (see `svft_jax.strategies.registry`):
    "rebuild" (merge once per call), "factored" (x ↦ x W0ᵀ + (x V)(U M)ᵀ, W never formed),
    "auto" (per target by the FLOP model `choose_strategy`, from d1, d2, rank and the tokens
    of the call), "rebuild_remat" (rebuild, W recomputed in the backward pass to save memory)
    or "reference" (the SVFT authors' layer, W rebuilt on every use). Results equal
    `apply_fn(merge(adapted), ...)` up to float rounding, under jit, grad and vmap, also when
    kernels are used inside `scan` (stacked layers: `nn.scan`), remat (`nn.remat`, HF gradient
    checkpointing), `cond`, `while_loop` and custom_jvp/custom_vjp functions, indexed per layer
    (`w[i]`) or in a dot batched over the layer axis (`nn.vmap`, experts).

    A use the interpreter cannot run with the strategy (e.g. a reshape of the kernel, a
    batched dot over stacked layers) gets the dense merged kernel and a `FallbackWarning`
    naming the path, primitive and reason. In a custom_jvp/custom_vjp function the primal runs
    the strategy and the user's derivative rule runs on the merged kernel (it is defined on
    it; custom_vjp keeps the strategy in the forward pass, custom_jvp under differentiation
    does not); the plan describes the forward call.

    Args:
      apply_fn: e.g. `model.apply`, `lambda p, x: module.apply({'params': p}, x)`, or a HF
        Flax model (`model`, with `params_argname="params"`).
      strategy: the default strategy for every target.
      overrides: {regex: strategy}; sugar for `rules=[Rule(path=regex, strategy=name), ...]`.
      rules: typed rules (`svft_jax.Rule`); the first rule with a `strategy` whose path fully
        matches a target's '/'-joined path picks its strategy (rules without a strategy, e.g.
        the ones `adapt` read, are skipped), then the `overrides` entries. A rule that matches
        no adapted path is a ValueError at the first call.
      params_argnum: position of the adapted tree among the positional arguments.
      params_argname: keyword under which the adapted tree is passed (e.g. "params" for
        `hf_model(input_ids, params=adapted)`); takes precedence over `params_argnum`.
      strict: raise `FallbackError` instead of warning `FallbackWarning`.
    Returns:
      A `Wrapped` callable; `wrapped.plan(*args, **kwargs)` maps each target's path to the
      strategies that ran its uses for a call with those arguments (e.g.
      {'.../query/kernel': ('factored',)}); `wrapped.last_plan` is that plan when every traced
      call structure agrees.
    Raises:
      ValueError for an unknown strategy or a bad regex (at wrap time); TypeError for a HF
      model without `params_argname`, or when the call has no adapted tree where
      `params_argnum`/`params_argname` point.
    """
    get_strategy(strategy)
    compiled = [r for r in as_rules(rules) if r.strategy is not None] if rules is not None else []
    for regex, name in (overrides or {}).items():
        compile_regex(regex, f"overrides key {regex!r}")
        compiled.append(Rule(path=regex, strategy=name, label=f"wrap(overrides=) key {regex!r}"))
    for rule in compiled:
        get_strategy(rule.strategy)
    if not isinstance(strict, bool):
        raise TypeError(f"`strict` must be a bool, got {strict!r}.")
    if params_argname is None and _is_hf_model(apply_fn):
        raise TypeError(
            f"wrap({type(apply_fn).__name__}) needs params_argname='params': a transformers Flax "
            f"model takes its parameters as a keyword, e.g. "
            f"`wrap(model, params_argname='params')(input_ids, params=adapted)`.")
    if params_argname is None and (params_argnum is None or isinstance(params_argnum, bool) or not isinstance(params_argnum, int)):
        raise TypeError(f"`params_argnum` must be an int (or pass `params_argname`), got {params_argnum!r}.")
    return Wrapped(apply_fn, strategy, compiled, params_argnum, params_argname, strict)
