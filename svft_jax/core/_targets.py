"""Choosing targets: which leaves of a parameter pytree an adapter replaces, with which layout,
and which leaves train in full (`extra`). Shared by SVFT and every baseline, so all methods pick
targets and read kernels the same way; everything is checked before any array is computed."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax._paths import compile_regex, matches, path_to_str
from svft_jax.core._protocol import Trainable, is_marker, is_node, is_special
from svft_jax.core.layout import KernelLayout, layout_candidates, resolve_layout

# A path component that marks a leaf the default targets never touch: embeddings, norms,
# biases and output heads (the paper adapts attention and MLP projections only).
DEFAULT_EXCLUDED_COMPONENT = re.compile(
    r"(?i)(.*embed.*|.*norm.*|ln|ln_.*|.*_ln|bias|head|.*_head|heads?_.*|classifier|pooler"
    r"|score|wte|wpe|patch_embeddings)"
)


@dataclasses.dataclass(frozen=True)
class Target:
    """One kernel chosen for adaptation: its path, the original leaf and its layout."""

    path: str
    kernel: Any
    layout: KernelLayout


def flatten_by_path(tree, *, keep_none: bool = False) -> dict[str, Any]:
    """{'/'-joined path: leaf} with nodes and markers as leaves (and None positions with `keep_none`:
    the holes of one half of `split`).

    Raises:
      ValueError when two leaves join to the same path (a key containing '/', like
      {"a/b": x} beside {"a": {"b": y}}): one would silently stand for the other.
    """
    flat = {}
    is_leaf = (lambda x: x is None or is_special(x)) if keep_none else is_special
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        name = path_to_str(path)
        if name in flat:
            raise ValueError(f"two parameters share the path {name!r} once keys are joined with '/' (a key contains '/'); rename the key so every path is unique.")
        flat[name] = leaf
    return flat


def _check_params(params, caller: str) -> None:
    if hasattr(params, "params") and hasattr(params, "config") and not isinstance(params, Mapping):
        raise TypeError(f"{caller} takes the parameter pytree, not the model object {type(params).__name__}; pass model.params (or the params you loaded).")
    if isinstance(params, str):
        raise TypeError(f"{caller} takes a parameter pytree as its first argument, got the string {params!r}; did you forget the params?")


def _is_default_candidate(path: str, leaf) -> bool:
    components = path.split("/")
    kernel_name = components[-1] == "kernel" or components[-2:] == ["kernel", "value"]
    return (
        kernel_name
        and hasattr(leaf, "ndim")
        and leaf.ndim >= 2
        and jnp.issubdtype(leaf.dtype, jnp.floating)
        and not any(DEFAULT_EXCLUDED_COMPONENT.fullmatch(c) for c in components[:-1])
    )


def _declared(path: str, layouts) -> Any:
    return next((layout for regex, layout in layouts if matches(regex, path)), None)


def select_targets(params, targets: str | None = None, exclude: str | None = None, *,
                   layouts: Mapping[str, Any] | None = None, leaves: Mapping[str, Any] | None = None) -> list[str]:
    """Paths that `apply` (or a baseline) would adapt: same rules, no SVD.

    Args:
      params: the parameter pytree.
      targets: regex matched in full against '/'-joined paths; None: every 2-D (or N-D)
        'kernel' outside embeddings, norms, biases and heads whose layout is known.
      exclude: regex of paths never adapted (it must match some parameter).
      layouts: {regex: layout} declared for kernels whose axes the shape cannot tell (the
        `layout` entries of `apply`'s `overrides`); a declared kernel is a default target.
      leaves: `flatten_by_path(params)` when the caller has it (the tree is flattened once).
    """
    _check_params(params, "select_targets")
    targets_re = compile_regex(targets, "targets")
    exclude_re = compile_regex(exclude, "exclude")
    compiled = [(compile_regex(r, f"layout key {r!r}"), v) for r, v in (layouts or {}).items()]
    leaves = flatten_by_path(params) if leaves is None else leaves
    if exclude_re is not None and not any(matches(exclude_re, p) for p in leaves):
        raise ValueError(f"exclude={exclude!r} matches no parameter; paths are '/'-joined and matched in full, e.g. {list(leaves)[:4]}.")
    chosen = []
    for name, leaf in leaves.items():
        if is_node(leaf):
            # Another method's target (a mixed tree); naming it as a target is an error.
            if matches(targets_re, name):
                raise ValueError(f"parameter {name!r} is already an adapter node; adapt the original params (or `merge` first).")
            continue
        if is_marker(leaf) or matches(exclude_re, name):
            continue
        if targets_re is None:
            if _is_default_candidate(name, leaf) and (
                _declared(name, compiled) is not None or layout_candidates(name, leaf.shape)
            ):
                chosen.append(name)
        elif matches(targets_re, name):
            chosen.append(name)
    if not chosen:
        nodes = [p for p, x in leaves.items() if is_node(x)]
        if nodes:
            raise ValueError(f"parameter {nodes[0]!r} is already an adapter node and no other parameter is a target; adapt the original params (or `merge` first).")
        sample = list(leaves)[:8]
        what = f"targets={targets!r}" if targets is not None else "the default targets (2-D+ 'kernel' leaves outside embeddings, norms and heads)"
        hint = " (the tree is empty: did you pass the model's params?)" if not leaves else ""
        raise ValueError(f"{what} matched no parameter (exclude={exclude!r}){hint}. Paths are '/'-joined and matched in full, e.g. {sample}; try a regex like '.*query/kernel'.")
    return chosen


def resolve_target(path: str, leaf, declared_layout=None) -> Target:
    """Check one chosen leaf (array, floating, ≥ 2-D, known layout) and read its layout.

    Works on concrete arrays and on `jax.ShapeDtypeStruct` (shapes only).
    """
    where = f"parameter {path!r}"
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise TypeError(f"{where} was chosen as a target but is a {type(leaf).__name__}, not an array.")
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(f"{where} was chosen as a target but has dtype {leaf.dtype}; only floating weights can be adapted. Narrow `targets` or add it to `exclude`.")
    if len(leaf.shape) < 2:
        raise ValueError(f"{where} was chosen as a target but has shape {tuple(leaf.shape)}; adapters need a 2-D (or N-D) kernel, not a {len(leaf.shape)}-D leaf. Narrow `targets` (biases and norms cannot be adapted).")
    if 0 in tuple(leaf.shape):
        raise ValueError(f"{where} was chosen as a target but has zero-size shape {tuple(leaf.shape)}: an empty kernel has no weights to adapt (and no SVD). Narrow `targets` or add it to `exclude`.")
    try:
        layout = resolve_layout(leaf.shape, jnp.dtype(leaf.dtype).name, declared_layout, path=path)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{where}: {err}") from err
    return Target(path, leaf, layout)


def check_finite(target: Target) -> None:
    """NaN/Inf in a kernel makes its SVD (or DoRA's norm) meaningless. Skipped for shapes."""
    kernel = target.kernel
    if isinstance(kernel, jax.ShapeDtypeStruct):
        return
    # numpy kernels are checked on the host (no device copy of the whole model)
    finite = np.isfinite(kernel).all() if isinstance(kernel, np.ndarray) else jnp.all(jnp.isfinite(kernel))
    if not bool(finite):
        raise ValueError(f"parameter {target.path!r} contains NaN or Inf; fix the checkpoint before adapting it.")


def check_extra(leaves: Mapping[str, Any], extra: str | None, targets=()) -> list[str]:
    """The plain leaves `extra` marks (targets excluded); raises when there are none, so a
    typo fails before any SVD instead of silently freezing the head."""
    extra_re = compile_regex(extra, "extra")
    if extra_re is None:
        return []
    targets = set(targets)
    candidates = {p: x for p, x in leaves.items() if p not in targets}
    matched = [p for p, x in candidates.items() if not is_special(x) and x is not None and matches(extra_re, p)]
    if not matched:
        adapters = [p for p, x in leaves.items() if (is_node(x) or p in targets) and matches(extra_re, p)]
        why = f" (it matches only adapted kernels {adapters[:3]}, which train their adapter already)" if adapters else ""
        raise ValueError(f"extra={extra!r} matches no parameter{why}; paths are '/'-joined and matched in full, e.g. {list(candidates)[:6]}.")
    return matched


def mark_trainable(tree, extra: str | None):
    """`tree` with every leaf whose path matches `extra` wrapped in `Trainable`.

    Args:
      tree: a parameter pytree (plain or adapted).
      extra: regex of leaves trained in full (e.g. 'classifier/.*'); None: `tree` unchanged.
    Raises:
      ValueError when `extra` matches no plain leaf (a typo would silently freeze the head).
    """
    if extra is None:
        return tree
    chosen = set(check_extra(flatten_by_path(tree), extra))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: Trainable(x) if path_to_str(path) in chosen else x, tree, is_leaf=is_special
    )
