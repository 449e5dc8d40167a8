"""`wrap(apply_fn)`: run a model on the adapted tree, each target with its execution strategy.

Design: a jaxpr interpreter (as lorax/qax do), not Flax method interception. Reasons:
  * it works on any JAX function over raw parameter pytrees — HF Flax models (params as a
    keyword), `module.apply`, linen, NNX `merge`d state, plain jnp code — with no model edit
    and no knowledge of which Flax class (Dense, DenseGeneral, GPT-2's Conv1D, ...) holds a
    kernel; interception would need one re-implementation per layer class and sees nothing
    that is not a linen module method;
  * the decision is made where the kernel meets the activation (`dot_general`), so the token
    count T the cost model needs is known exactly, per call;
  * anything the interpreter does not understand gets the dense merged kernel, so the result
    is always the merged model's (the worst case is `rebuild` speed, never a wrong answer).
Cost: the model is traced twice per compilation (once to a jaxpr, once through the
interpreter); under `jit` that is compile time only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax

from svft_jax._paths import compile_regex, matches, path_to_str
from svft_jax.strategies.interpreter import KernelProxy, interpret, is_array
from svft_jax.strategies.registry import get_strategy
from svft_jax.transform._merge import merge, strip_markers
from svft_jax.transform._protocol import is_node


class _Placeholder:
    """Stands for one node's kernel while the model is traced to a jaxpr."""

    def __init__(self, node, path: str, strategy: str):
        self.node, self.path, self.strategy = node, path, strategy
        layout = node.meta.layout
        self.aval = jax.ShapeDtypeStruct(layout.shape, layout.dtype)


def _aval(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=getattr(jax.typeof(x), "weak_type", False))


def wrap(
    apply_fn: Callable,
    strategy: str = "auto",
    *,
    overrides: Mapping[str, str] | None = None,
    params_argnum: int | None = 0,
    params_argname: str | None = None,
) -> Callable:
    """A function with `apply_fn`'s signature that takes the adapted tree in place of params.

    Each adapted kernel is executed with a strategy (see `svft_jax.strategies.registry`):
    "rebuild" (merge once per call), "factored" (x ↦ x W0ᵀ + (x V)(U M)ᵀ, W never formed),
    "auto" (per target by the FLOP model `choose_strategy`, from d1, d2, rank and the tokens
    of the call), "rebuild_remat" (rebuild, W recomputed in the backward pass to save memory)
    or "reference" (the SVFT authors' layer: dense M, W rebuilt on every use). Results equal
    `apply_fn(merge(adapted), ...)` up to float rounding, under jit, grad and vmap.

    Args:
      apply_fn: e.g. `model.apply`, `lambda p, x: module.apply({'params': p}, x)`, or a HF
        Flax model (`model`, whose `__call__` takes `params=` as a keyword).
      strategy: the default strategy for every target.
      overrides: {regex: strategy}; the first regex that fully matches a target's
        '/'-joined path (as in `svft_jax.apply`) picks its strategy.
      params_argnum: position of the adapted tree among the positional arguments.
      params_argname: keyword under which the adapted tree is passed (e.g. "params" for
        `hf_model(input_ids, params=adapted)`); takes precedence over `params_argnum`.
    Returns:
      `wrapped(*args, **kwargs)`; after each trace, `wrapped.last_plan` maps each target's
      path to the strategies that ran its dots (e.g. {'.../query/kernel': ('factored',)}).
    Raises:
      ValueError for an unknown strategy or a bad regex (at wrap time); TypeError when the
      call has no adapted tree where `params_argnum`/`params_argname` point.
    """
    get_strategy(strategy)
    compiled = []
    for regex, name in (overrides or {}).items():
        get_strategy(name)
        compiled.append((compile_regex(regex, f"overrides key {regex!r}"), name))
    if params_argname is None and (params_argnum is None or isinstance(params_argnum, bool) or not isinstance(params_argnum, int)):
        raise TypeError(f"`params_argnum` must be an int (or pass `params_argname`), got {params_argnum!r}.")

    def strategy_for(path: str) -> str:
        return next((name for regex, name in compiled if matches(regex, path)), strategy)

    @functools.wraps(apply_fn)
    def wrapped(*args, **kwargs):
        args = list(args)
        if params_argname is not None:
            if params_argname not in kwargs:
                raise TypeError(f"wrapped function expects the adapted tree as keyword {params_argname!r}; got keywords {sorted(kwargs)}.")
            adapted = kwargs[params_argname]
        else:
            if params_argnum >= len(args):
                raise TypeError(f"wrapped function expects the adapted tree as positional argument {params_argnum}, but got {len(args)} positional arguments (use params_argname= for keyword params).")
            adapted = args[params_argnum]

        adapted = strip_markers(adapted)  # the model takes arrays where `Trainable` marks a leaf
        flat, treedef = jax.tree_util.tree_flatten_with_path(adapted, is_leaf=is_node)
        placeholders = {}
        leaves = []
        for path, leaf in flat:
            if is_node(leaf):
                name = path_to_str(path)
                placeholders[name] = _Placeholder(leaf, name, strategy_for(name))
                leaves.append(placeholders[name])
            else:
                leaves.append(leaf)
        if not placeholders or all(p.strategy == "rebuild" for p in placeholders.values()):
            # Nothing to interpret: merge once and call the model directly.
            wrapped.last_plan = {name: ("rebuild",) for name in placeholders}
            dense_args, dense_kwargs = _replace(args, kwargs, merge(adapted), params_argnum, params_argname)
            return apply_fn(*dense_args, **dense_kwargs)
        traced_tree = jax.tree_util.tree_unflatten(treedef, leaves)
        new_args, new_kwargs = _replace(args, kwargs, traced_tree, params_argnum, params_argname)

        all_leaves, call_tree = jax.tree_util.tree_flatten((new_args, new_kwargs))
        dynamic = [i for i, leaf in enumerate(all_leaves) if is_array(leaf) or isinstance(leaf, _Placeholder)]

        def flat_fn(*values):
            filled = list(all_leaves)
            for i, value in zip(dynamic, values, strict=True):
                filled[i] = value
            call_args, call_kwargs = jax.tree_util.tree_unflatten(call_tree, filled)
            return apply_fn(*call_args, **call_kwargs)

        avals = [all_leaves[i].aval if isinstance(all_leaves[i], _Placeholder) else _aval(all_leaves[i]) for i in dynamic]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)

        caches = {}
        values = []
        for i in dynamic:
            leaf = all_leaves[i]
            if isinstance(leaf, _Placeholder):
                caches[leaf.path] = {}
                values.append(KernelProxy(leaf.node, leaf.path, get_strategy(leaf.strategy),
                                          tuple(range(len(leaf.aval.shape))), leaf.aval.dtype, caches[leaf.path]))
            else:
                values.append(leaf)
        outs = interpret(closed.jaxpr, closed.consts, values)
        wrapped.last_plan = {path: tuple(cache.get("used", ())) for path, cache in caches.items()}
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    wrapped.last_plan = {}
    return wrapped


def _replace(args: list, kwargs: dict, tree, params_argnum, params_argname):
    """(args, kwargs) with the adapted tree replaced by `tree`."""
    args, kwargs = list(args), dict(kwargs)
    if params_argname is not None:
        kwargs[params_argname] = tree
    else:
        args[params_argnum] = tree
    return args, kwargs
