"""Adapter sets as pytrees: create, add, remove, select, mix, route, extract, insert, summary.

A set tree is a parameter pytree whose SVFT targets are `AdapterSetNode`s (one frozen SVD, K
coefficient banks). Every function here is pure: it returns a new tree and never copies U, s,
V or W0 (the new nodes hold the same arrays).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax._paths import path_to_str
from svft_jax.core._merge import check_whole
from svft_jax.core._protocol import is_marker, is_node, is_special
from svft_jax.methods.svft._node import StaticIndices, SVFTMeta, SVFTNode
from svft_jax.methods.svft.banks._node import AdapterSetNode, SetMeta

# Plan fields that every adapter of one set shares (they fix U, s, V and W0); the pattern
# fields (pattern, d, k, seed, init) may differ per adapter.
_SHARED = ("path", "layout", "rank", "factor_dtype", "keep_base", "svd_backend", "svd_dtype")


def _nodes(tree, kind, caller: str) -> dict:
    found = {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_special)[0] if is_node(x)}
    bad = {p: type(x).__name__ for p, x in found.items() if not isinstance(x, kind)}
    if bad:
        path, name = next(iter(bad.items()))
        raise TypeError(f"{caller}: target {path!r} is a {name}; expected {kind.__name__} "
                        f"({'an adapter set from svft_jax.adapters.create' if kind is AdapterSetNode else 'an SVFT tree from svft_jax.apply'}).")
    if not found:
        raise ValueError(f"{caller}: the tree has no {kind.__name__}; pass "
                         f"{'svft_jax.adapters.create(adapted, name)' if kind is AdapterSetNode else 'the output of svft_jax.apply'}.")
    return found


def _replace_nodes(tree, fn):
    return jax.tree_util.tree_map(lambda x: fn(x) if is_node(x) else x, tree, is_leaf=is_special)


def _check_name(name, caller: str) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{caller}: an adapter name must be a non-empty str, got {name!r}.")
    return name


def _check_svft(node: SVFTNode, where: str) -> None:
    if node.gate is not None:
        raise ValueError(f"{where}: target {node.path!r} uses init='reference' (m · sigmoid(gate)); adapter sets store "
                         "plain coefficients. Apply with init='zeros', or fold the gate into m first.")
    if node.meta.per_layer_indices:
        raise ValueError(f"{where}: target {node.path!r} has a per-layer Ω {node.meta.rows.array.shape}; adapter sets "
                         "need one Ω shared by the layers of a stacked kernel (pattern plain, banded or random).")


def _union(members: Sequence[SVFTMeta]):
    """The union Ω (sorted by (row, col)) and each member's positions in it."""
    r = members[0].rank
    flat = [m.rows.array.astype(np.int64) * r + m.cols.array for m in members]
    union = np.unique(np.concatenate(flat))
    positions = tuple(StaticIndices(np.searchsorted(union, f)) for f in flat)
    return StaticIndices(union // r), StaticIndices(union % r), positions


def _set_node(first, members, banks, names, weights):
    """A set node sharing `first`'s arrays, with banks (one (*stack, |Ω_k|) per member)."""
    rows, cols, positions = _union(members)
    n = rows.array.shape[0]
    stack = first.layout.stack_shape
    full = []
    for bank, where in zip(banks, positions, strict=True):
        full.append(jnp.zeros((*stack, n), jnp.float32).at[..., where.array].set(jnp.asarray(bank, jnp.float32)))
    bank = jnp.stack(full) if full else jnp.zeros((0, *stack, n), jnp.float32)
    meta = SetMeta(members[0].plan if members else first.meta.plan, rows, cols, tuple(names), tuple(members), positions)
    return AdapterSetNode(u=first.u, s=first.s, v=first.v, base=first.base, bank=bank, weights=weights, meta=meta)


def _bank_of(node: AdapterSetNode, index: int):
    """Adapter `index`'s own coefficients (*stack, |Ω_k|)."""
    return node.bank[index][..., node.meta.positions[index].array]


def create(adapted, name: str = "default", *, active: str | None = "first"):
    """An adapter set holding one adapter: the SVFT tree `adapted` under `name`.

    Args:
      adapted: an SVFT tree (`svft_jax.apply`, `load_adapter`, or a trained `combine`).
      name: the adapter's name.
      active: "first" (the adapter is on), or None (the base model until `select`).
    Returns:
      The tree with each `SVFTNode` replaced by an `AdapterSetNode` (K = 1) sharing its U, s, V, W0.
    Raises:
      TypeError/ValueError for a tree without SVFT nodes, non-SVFT nodes, init="reference".
    """
    _check_name(name, "create")
    check_whole(adapted, "create")
    for node in _nodes(adapted, SVFTNode, "create").values():
        _check_svft(node, "create")
    on = 1.0 if active == "first" else 0.0
    if active not in ("first", None):
        raise ValueError(f"create: `active` must be 'first' or None, got {active!r}.")
    return _replace_nodes(adapted, lambda x: _set_node(x, [x.meta], [x.m], [name], jnp.full((1,), on, jnp.float32)))


def names(set_tree) -> tuple[str, ...]:
    """The adapters' names, in bank order (the order of `mix` vectors and routing ids)."""
    nodes = _nodes(set_tree, AdapterSetNode, "names")
    return next(iter(nodes.values())).meta.names


def _index(set_tree, name, caller: str) -> int:
    known = names(set_tree)
    if name not in known:
        raise ValueError(f"{caller}: no adapter named {name!r}; the set holds {list(known)}.")
    return known.index(name)


def _check_same_base(set_node: AdapterSetNode, node: SVFTNode, where: str) -> None:
    shared, other = set_node.meta.plan, node.meta.plan
    differs = [f"{f}: {getattr(shared, f)!r} vs {getattr(other, f)!r}" for f in _SHARED if getattr(shared, f) != getattr(other, f)]
    if differs:
        raise ValueError(f"{where}: target {node.path!r} was adapted with other base settings ({'; '.join(differs)}); "
                         "every adapter of a set must share U, s, V — apply with the same rank/dtypes/SVD settings.")
    if node.u is not set_node.u and not (np.array_equal(np.asarray(node.s), np.asarray(set_node.s))
                                        and np.array_equal(np.asarray(node.u), np.asarray(set_node.u))):
        raise ValueError(f"{where}: target {node.path!r} has other singular vectors than the set (another base model, or "
                         "another SVD); adapt the same base params with the same svd_backend, or pass factors=.")


def _outside_leaves(tree) -> dict:
    """{path: (value, marked)} of every leaf that is not an adapter node (`Trainable` unwrapped)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_special)[0]
    return {path_to_str(p): (x.value, True) if is_marker(x) else (x, False) for p, x in leaves if not is_node(x)}


def _same_leaf(a, b) -> bool:
    if a is b:
        return True
    try:
        return (np.shape(a) == np.shape(b) and jnp.result_type(a) == jnp.result_type(b)
                and bool(jnp.array_equal(a, b, equal_nan=True)))
    except TypeError:  # not an array (a static leaf)
        return type(a) is type(b) and a == b


def _check_shared(set_tree, adapted, name: str, where: str) -> None:
    """Refuse an adapter whose leaves outside the SVFT targets differ from the set's.

    A set varies only the SVFT coefficients; every other leaf — a head trained with `extra=`
    included — is one value shared by all its adapters (`select`, `route` and `mix` run it for
    every adapter, `extract` and `save` hand it to every adapter). An adapter with its own value
    there would silently run (and be saved) with another adapter's.
    """
    mine, theirs = _outside_leaves(set_tree), _outside_leaves(adapted)
    if set(mine) != set(theirs):
        raise ValueError(f"{where}: adapter {name!r} is another parameter tree than the set's (leaves only in the set "
                         f"{sorted(set(mine) - set(theirs))[:3]}, only in the adapter {sorted(set(theirs) - set(mine))[:3]}); "
                         "adapt the same base params.")
    for path, (value, marked) in theirs.items():
        held, held_marked = mine[path]
        if not _same_leaf(value, held):
            kind = "a leaf it trained in full (extra=)" if marked or held_marked else "a parameter outside the SVFT targets"
            raise ValueError(
                f"{where}: adapter {name!r} has its own value of {path!r} ({kind}), which differs from the one the set's "
                f"adapters {list(names(set_tree))} share. An adapter set varies only the SVFT coefficients: every other leaf "
                f"is shared, so {name!r} would run and be saved with another adapter's {path!r}. Train the adapters of one "
                "set with that leaf frozen (e.g. from adapters.extract(tree, name) with "
                "svft_jax.optimizer(tx, extra_tx=optax.set_to_zero())), or keep one set per head.")


def _adapter_nodes(set_tree, adapted, name: str, where: str) -> dict:
    """{path: SVFT node} of `adapted`, checked against the set: same targets, same base and SVD."""
    set_nodes = _nodes(set_tree, AdapterSetNode, where)
    check_whole(adapted, where)
    nodes = _nodes(adapted, SVFTNode, where)
    if set(nodes) != set(set_nodes):
        raise ValueError(f"{where}: adapter {name!r} adapts other targets than the set: only in the set "
                         f"{sorted(set(set_nodes) - set(nodes))[:3]}, only in the adapter {sorted(set(nodes) - set(set_nodes))[:3]}.")
    for p, node in nodes.items():
        _check_svft(node, f"{where}({name!r})")
        _check_same_base(set_nodes[p], node, f"{where}({name!r})")
    return nodes


def add(set_tree, name: str, adapted=None):
    """Add adapter `name` to the set (inactive; `select` or `route` turns it on).

    Args:
      set_tree: an adapter set.
      name: a new name.
      adapted: an SVFT tree over the same base (same targets, same U, s, V; its pattern and Ω may
        differ — the bank then lives on the union Ω), or None for a new adapter at M = 0 on the
        first adapter's Ω.
    Raises:
      ValueError naming the target: an existing name, other targets, another base or SVD.
      ValueError naming the leaf: `adapted` has its own value of a leaf outside the SVFT targets
        (a head it trained with `extra=`): the set shares one value of every such leaf.
    """
    _check_name(name, "add")
    if name in names(set_tree):
        raise ValueError(f"add: the set already holds an adapter named {name!r}; remove it first or use insert(tree, {name!r}, adapted).")
    set_nodes = _nodes(set_tree, AdapterSetNode, "add")
    if adapted is None:
        new = {p: (x.meta.members[0], jnp.zeros_like(_bank_of(x, 0))) for p, x in set_nodes.items()}
    else:
        nodes = _adapter_nodes(set_tree, adapted, name, "add")
        _check_shared(set_tree, adapted, name, "add")
        new = {p: (node.meta, node.m) for p, node in nodes.items()}

    def grow(x):
        k = len(x.meta.names)
        member, bank = new[x.path]
        banks = [_bank_of(x, i) for i in range(k)] + [bank]
        weights = jnp.concatenate([x.weights, jnp.zeros((*x.weights.shape[:-1], 1), x.weights.dtype)], axis=-1)
        return _set_node(x, [*x.meta.members, member], banks, [*x.meta.names, name], weights)

    return _replace_nodes(set_tree, grow)


def remove(set_tree, name: str):
    """The set without adapter `name` (its weight column dropped)."""
    index = _index(set_tree, name, "remove")
    if len(names(set_tree)) == 1:
        raise ValueError(f"remove: {name!r} is the set's only adapter; use extract(tree, None) for the base model's SVFT tree.")

    def shrink(x):
        keep = [i for i in range(len(x.meta.names)) if i != index]
        return _set_node(x, [x.meta.members[i] for i in keep], [_bank_of(x, i) for i in keep],
                         [x.meta.names[i] for i in keep], jnp.take(x.weights, np.array(keep), axis=-1))

    return _replace_nodes(set_tree, shrink)


def _with_weights(set_tree, weights):
    return _replace_nodes(set_tree, lambda x: dataclasses.replace(x, weights=weights))


def weights_for(set_tree, active) -> np.ndarray:
    """The (K,) weight vector that `select`/`mix` install: for hot-swapping one jitted function,
    pass a new vector as data (`with_weights`).

    Raises:
      ValueError for an unknown name or a weight that is not finite in float32 (NaN, ±inf);
      TypeError for a weight that is not a number.
    """
    return weight_vector(set_tree, active, "weights_for")


def weight_vector(set_tree, active, caller: str) -> np.ndarray:
    """`weights_for`, with `caller` naming the public function in its refusals."""
    known = names(set_tree)
    if active is None:
        return np.zeros(len(known), np.float32)
    if isinstance(active, str):
        active = {active: 1.0}
    if not isinstance(active, Mapping):
        raise TypeError(f"{caller}: `active` must be an adapter name, a {{name: weight}} mapping or None (the base model), got {active!r}.")
    unknown = [n for n in active if n not in known]
    if unknown:
        raise ValueError(f"{caller}: no adapter named {unknown[0]!r}; the set holds {list(known)}.")
    vector = np.zeros(len(known), np.float32)
    for n, w in active.items():
        if isinstance(w, jax.core.Tracer):
            raise TypeError(f"{caller}: the weight of adapter {n!r} is traced (inside jit); pass traced weights as one "
                            "vector with svft_jax.adapters.with_weights(tree, weights).")
        try:
            value = float(w)
        except (TypeError, ValueError):
            raise TypeError(f"{caller}: the weight of adapter {n!r} must be a number, got {w!r}.") from None
        with np.errstate(over="ignore"):
            value = np.float32(value)
        if not math.isfinite(value):
            raise ValueError(f"{caller}: the weight of adapter {n!r} is {w!r} ({value} in float32); mixing weights must "
                             "be finite, or the whole model is NaN. Pass finite weights.")
        vector[known.index(n)] = value
    return vector


def select(set_tree, active):
    """Turn one adapter on (`active="name"`), or none (`active=None`: the base model W0).

    The choice is an array (one-hot weights), so a jitted function called with the result does not
    retrace when `active` changes.
    """
    return _with_weights(set_tree, jnp.asarray(weight_vector(set_tree, active, "select")))


def _mapping(weights, caller: str, argument: str) -> dict:
    if not isinstance(weights, Mapping):
        raise TypeError(f"{caller}: `{argument}` must be a {{adapter name: weight}} mapping, got {weights!r}.")
    return dict(weights)


def mix(set_tree, weights: Mapping[str, float]):
    """A weighted combination W = W0 + U (Σ_k w_k M_k) Vᵀ, e.g. mix(tree, {"a": 0.5, "b": 0.5}).

    ΔW is linear in M, so this is exactly Σ_k w_k ΔW_k: task arithmetic in coefficient space
    (on the union of the adapters' Ω). Weights are data: no retrace between mixes.
    """
    return _with_weights(set_tree, jnp.asarray(weight_vector(set_tree, _mapping(weights, "mix", "weights"), "mix")))


def with_weights(set_tree, weights):
    """The set with mixing weights `weights`: (K,) for the whole batch or (B, K) per example.

    Concrete weights must be finite (in float32); traced ones (inside `jit`) are data and are not
    checked: a non-finite traced weight makes the outputs it touches NaN.
    """
    k = len(names(set_tree))
    if jnp.ndim(weights) not in (1, 2) or jnp.shape(weights)[-1] != k:
        raise ValueError(f"with_weights: `weights` must be (K,) or (batch, K) with K = {k} adapters {list(names(set_tree))}, got shape {jnp.shape(weights)}.")
    dtype = jnp.result_type(weights)
    if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"with_weights: `weights` must be real numbers, got dtype {dtype}.")
    weights = jnp.asarray(weights, jnp.float32)
    try:
        concrete = np.asarray(weights)
    except jax.errors.TracerArrayConversionError:  # traced weights: data, checked by the caller
        concrete = None
    if concrete is not None and not np.all(np.isfinite(concrete)):
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(concrete))[0])
        raise ValueError(f"with_weights: weights{list(where)} is {concrete[where]} (adapter {names(set_tree)[where[-1]]!r}); mixing "
                         "weights must be finite in float32, or the model is NaN. Pass finite weights.")
    return _with_weights(set_tree, weights)


def route(set_tree, adapter_ids):
    """Per-example routing: example b of the next batch runs adapter `adapter_ids[b]`.

    Args:
      set_tree: an adapter set.
      adapter_ids: (batch,) ints in [0, K) (bank order, see `names`), or -1 for the base model.
        May be a traced array: routing is data.
    Returns:
      The set with (batch, K) one-hot weights. Run it with `svft_jax.wrap(fn, strategy="routed")`;
      every adapted layer's input must have the batch as its leading axis.
    Raises:
      ValueError for concrete ids outside [-1, K). A traced id outside [-1, K) (inside `jit`,
      where it cannot be refused) gets a row of NaN weights, so its example's outputs are NaN —
      visibly wrong, never silently the base model; the other examples are unaffected.
    """
    k = len(names(set_tree))
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"route: `adapter_ids` must be a (batch,) int array, got shape {ids.shape} dtype {ids.dtype}.")
    try:
        concrete = np.asarray(ids)
    except jax.errors.TracerArrayConversionError:  # traced ids (inside jit): checked by the caller
        concrete = None
    if concrete is not None:
        bad = concrete[(concrete < -1) | (concrete >= k)]
        if bad.size:
            raise ValueError(f"route: adapter id {int(bad[0])} is out of range; the set holds {k} adapters {list(names(set_tree))} (ids 0..{k - 1}, -1 = base).")
    weights = jax.nn.one_hot(ids, k, dtype=jnp.float32)
    if concrete is None:  # one_hot maps an out-of-range id to a zero row, i.e. the base model: poison it
        weights = jnp.where(((ids >= -1) & (ids < k))[:, None], weights, jnp.nan)
    return _with_weights(set_tree, weights)


def extract(set_tree, name: str | None):
    """Adapter `name` as an ordinary SVFT tree (its own pattern and Ω), sharing the set's U, s, V, W0.

    This is how one adapter is trained while the others stay frozen: `svft_jax.optimizer` and
    `split` on the extracted tree see only its m; `insert` puts the trained m back. It is also
    what `svft_jax.merge`, `summary` and `svft_jax.checkpoint.save_adapter` take. `name=None`
    gives the base model (the first adapter's Ω at M = 0).
    """
    index = 0 if name is None else _index(set_tree, name, "extract")

    def one(x):
        member = x.meta.members[index]
        m = jnp.zeros_like(_bank_of(x, 0)) if name is None else _bank_of(x, index)
        return SVFTNode(u=x.u, s=x.s, v=x.v, m=m, gate=None, base=x.base, meta=member)

    _nodes(set_tree, AdapterSetNode, "extract")
    return _replace_nodes(set_tree, one)


def insert(set_tree, name: str, adapted):
    """The set with adapter `name` replaced by (or, if new, extended with) the SVFT tree `adapted`.

    The weights keep their values (a new adapter starts off). `adapted` must adapt the same
    targets of the same base as the set (as `add` requires). Leaves outside the SVFT targets (a
    head trained with `extra=`) are shared by a set's adapters: replacing the only adapter of a
    one-adapter set takes `adapted`'s; in a larger set they must equal the set's (see `add`).
    """
    if name not in names(set_tree):
        return add(set_tree, name, adapted)
    current = names(set_tree)
    weights = next(iter(_nodes(set_tree, AdapterSetNode, "insert").values())).weights
    if len(current) > 1:
        rebuilt = add(remove(set_tree, name), name, adapted)
    else:
        _adapter_nodes(set_tree, adapted, name, "insert")  # same targets, base and SVD as K ≥ 2 requires
        rebuilt = create(adapted, name)
    order = [names(rebuilt).index(n) for n in current]
    return _replace_nodes(rebuilt, lambda x: _reorder(x, order, weights))


def _reorder(x, order, weights):
    return _set_node(x, [x.meta.members[i] for i in order], [_bank_of(x, i) for i in order],
                     [x.meta.names[i] for i in order], weights)


def summary(set_tree, print_fn=print) -> str:
    """One row per adapter: name, patterns, targets, trainable coefficients, ‖ΔW‖_F over targets;
    and the memory of the set against K merged copies."""
    nodes = _nodes(set_tree, AdapterSetNode, "summary")
    known = names(set_tree)
    rows = []
    for i, n in enumerate(known):
        patterns = sorted({x.meta.members[i].plan.pattern + (f"(d={x.meta.members[i].plan.d})" if x.meta.members[i].plan.pattern == "banded" else "")
                           for x in nodes.values()})
        count = sum(int(np.prod(_bank_of(x, i).shape)) for x in nodes.values())
        norm = float(np.sqrt(sum(float(jnp.sum(jnp.square(_bank_of(x, i)))) for x in nodes.values())))
        rows.append((n, ",".join(patterns), str(len(nodes)), f"{count:,}", f"{norm:.4g}"))
    header = ("adapter", "pattern", "targets", "trainable", "‖m‖₂")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()  # noqa: E731
    shared = sum(sum(int(np.prod(a.shape)) for a in (x.u, x.s, x.v, x.base) if a is not None) for x in nodes.values())
    banks = sum(int(np.prod(x.bank.shape)) for x in nodes.values())
    footer = f"{len(known)} adapters on one base: shared factors {shared:,} values, banks {banks:,} values (union Ω)"
    text = "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows), footer])
    if print_fn is not None:
        print_fn(text)
    return text
