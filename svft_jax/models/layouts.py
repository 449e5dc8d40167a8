"""Explicit kernel layouts for Flax linen / NNX models: `overrides` for `svft_jax.apply`.

`svft_jax.apply` never guesses a kernel layout (see `svft_jax.core.layout`): it reads
2-D kernels as (in, out), flax attention kernels and linen `nn.scan`/`nn.vmap` auto-named
stacks from their paths, and refuses the rest with the readings listed. These helpers
declare what the path cannot show:

* `nnx_layouts(model)` reads every `nnx.Linear`, `nnx.LinearGeneral` (so
  `nnx.MultiHeadAttention`), `nnx.Einsum`, `nnx.Conv` and `nnx.ConvTranspose` of a live NNX
  model — its features, einsum string, kernel size — including the leading axes `nnx.vmap`
  stacks add, which leave no mark in the path. Exact, so it is the way to adapt NNX models;
* `attention_layouts(scope, stack_ndim=...)` declares flax attention kernels under any
  module name (the path rules need a name that says attention);
* `stacked_layouts(paths)` declares `Dense` stacks scanned under a user-chosen name
  (`nn.scan(...)(name="layers")`), which the path rules do not count.

Overrides are matched first-to-last and the first match wins (for every option, not just the
layout), so put the more specific dict first: `{**attention_layouts(stack_ndim=1),
**stacked_layouts()}`, and pass per-target options with the layouts
(`nnx_layouts(model, pattern="banded", d=2)`).
"""

from __future__ import annotations

import re
from typing import Any


def _layout(stack_ndim: int, in_axes: tuple[int, ...], out_axes: tuple[int, ...]) -> dict[str, Any]:
    shift = lambda axes: tuple(a + stack_ndim for a in axes)  # noqa: E731
    return {"layout": {"stack_ndim": stack_ndim, "in_axes": shift(in_axes), "out_axes": shift(out_axes)}}


def attention_layouts(scope: str = r"(?:.*/)?", *, stack_ndim: int = 0) -> dict[str, dict[str, Any]]:
    """Overrides for `nn.MultiHeadDotProductAttention` / `nnx.MultiHeadAttention` kernels.

    Args:
      scope: regex of the path before 'query/kernel' etc., ending in '/' or empty
        (default: any).
      stack_ndim: leading stacked-layer axes (1 inside `nn.scan`).

    Returns:
      {regex: {"layout": ...}} with W (heads·head_dim × in) for query/key/value kernels
      (*stack, in, heads, head_dim) and W (out × heads·head_dim) for out kernels
      (*stack, heads, head_dim, out). Paths may end in 'kernel' (linen, NNX pure dict) or
      'kernel/value' (NNX `State`).
    """
    return {
        rf"{scope}(?:query|key|value)/kernel(?:/value)?": _layout(stack_ndim, (0,), (1, 2)),
        rf"{scope}out/kernel(?:/value)?": _layout(stack_ndim, (0, 1), (2,)),
    }


def stacked_layouts(paths: str = r".*", *, stack_ndim: int = 1) -> dict[str, dict[str, Any]]:
    """Overrides for `Dense` kernels stacked by `nn.scan`/`nnx.vmap`: (*stack, in, out).

    Args:
      paths: regex of the stacked kernels' paths (default: all).
      stack_ndim: number of leading layer axes.

    Returns:
      {paths: {"layout": ...}}: each layer is factorised separately, W_l = kernel[l]ᵀ.
    """
    return {paths: _layout(stack_ndim, (0,), (1,))}


# --- NNX: read the layouts from the modules themselves ----------------------------------------

def _shape(variable) -> tuple[int, ...]:
    value = variable.get_value() if hasattr(variable, "get_value") else variable.value
    return tuple(int(s) for s in value.shape)


def _einsum_axes(einsum_str: str, where: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(batch, in, out) axes of an einsum's kernel operand 'lhs,KERNEL->out'."""
    spec = einsum_str.replace(" ", "").replace("...", "")
    match = re.fullmatch(r"([A-Za-z]*),([A-Za-z]+)->([A-Za-z]*)", spec)
    if match is None:
        raise ValueError(f"{where}: einsum string {einsum_str!r} is not 'lhs,kernel->out' with two operands; declare the kernel's layout in overrides.")
    lhs, kernel, out = match.groups()
    batch, ins, outs = [], [], []
    for axis, letter in enumerate(kernel):
        if letter in lhs and letter in out:
            batch.append(axis)
        elif letter in lhs:
            ins.append(axis)
        elif letter in out:
            outs.append(axis)
        else:
            raise ValueError(f"{where}: einsum {einsum_str!r} sums the kernel's axis {letter!r} on its own, so the kernel is not one linear map per batch entry; declare its layout in overrides.")
    if batch != list(range(len(batch))):
        raise ValueError(f"{where}: einsum {einsum_str!r} has batch (shared) kernel axes {[kernel[a] for a in batch]} that are not leading; SVFT stacks only leading axes, so declare a layout or reorder the einsum.")
    if not ins or not outs:
        raise ValueError(f"{where}: einsum {einsum_str!r} has no {'contracted' if not ins else 'output'} kernel axis, so its kernel is not a matrix; leave it out with exclude=.")
    return tuple(batch), tuple(ins), tuple(outs)


def _module_layout(module, where: str) -> tuple[tuple[int, ...], dict] | None:
    """(unstacked kernel shape, layout spec on it) for the NNX modules whose kernels we know."""
    from flax import nnx

    if isinstance(module, nnx.Linear):
        return (module.in_features, module.out_features), dict(stack_ndim=0, in_axes=(0,), out_axes=(1,))
    if isinstance(module, nnx.LinearGeneral):
        batch = tuple(module.batch_axis.values())
        ins, outs = tuple(module.in_features), tuple(module.out_features)
        nb, ni, no = len(batch), len(ins), len(outs)
        spec = dict(stack_ndim=nb, in_axes=tuple(range(nb, nb + ni)), out_axes=tuple(range(nb + ni, nb + ni + no)))
        return (*batch, *ins, *outs), spec
    if isinstance(module, nnx.Einsum):
        if module.einsum_str is None:
            return None  # the einsum string comes with each call: nothing to read here
        batch, ins, outs = _einsum_axes(module.einsum_str, where)
        return tuple(module.kernel_shape), dict(stack_ndim=len(batch), in_axes=ins, out_axes=outs)
    if isinstance(module, nnx.ConvTranspose | nnx.Conv):
        shape = tuple(module.kernel_shape)
        taps = tuple(range(len(shape) - 2))
        if isinstance(module, nnx.ConvTranspose) and module.transpose_kernel:  # (*taps, out, in)
            return shape, dict(stack_ndim=0, in_axes=(*taps, len(shape) - 1), out_axes=(len(shape) - 2,))
        return shape, dict(stack_ndim=0, in_axes=(*taps, len(shape) - 2), out_axes=(len(shape) - 1,))
    return None


def nnx_layouts(model, *, targets: str | None = None, exclude: str | None = None, **options) -> dict[str, dict[str, Any]]:
    """Overrides declaring the layout of each target kernel of an NNX model, read from its modules.

    `nnx.Linear` (in, out); `nnx.LinearGeneral` (*batch, *in, *out), so the query/key/value
    (in, heads, head_dim) and out (heads, head_dim, out) kernels of `nnx.MultiHeadAttention`
    at any width; `nnx.Einsum` from its einsum string (contracted kernel axes are inputs,
    kept ones outputs, shared leading ones stacked); `nnx.Conv`/`nnx.ConvTranspose` as
    W (out × taps·in). Axes in front of a module's own kernel shape are the layers
    `nnx.vmap` stacked (it puts them first). Other modules get no entry.

    Only kernels that `svft_jax.apply(state, targets=targets, exclude=exclude)` adapts get an
    entry (`apply` refuses an override that matches no target): pass the same `targets` and
    `exclude` to both. Convolutions are entered only when `targets` names them, since the
    default targets leave them out.

    Args:
      model: an `nnx.Module` (abstract ones from `nnx.eval_shape` work too).
      targets, exclude: as in `svft_jax.apply` (None: the default targets).
      **options: other per-target options for `svft_jax.apply` (pattern, d, k, rank, ...)
        to put in every entry, since the first matching override wins.

    Returns:
      {regex: {"layout": {...}, **options}} matching each kernel's path in an `nnx.split`
      State ('attn/query/kernel/value') and in its pure dict ('attn/query/kernel').

    Raises:
      ValueError naming the module path when a kernel's shape does not match its module
      (a stack axis that is not leading) or an einsum is not one matrix per batch entry.
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise TypeError(f"nnx_layouts expects an nnx.Module, got {type(model).__name__}; for linen params use attention_layouts / stacked_layouts.")
    from svft_jax.core import select_targets

    overrides, state_paths = {}, {}
    for parts, module in nnx.iter_modules(model):
        path = "/".join([*map(str, parts), "kernel"])
        where = f"NNX module {'/'.join(map(str, parts)) or '(root)'!r} ({type(module).__name__})"
        known = _module_layout(module, where)
        if known is None or not isinstance(getattr(module, "kernel", None), nnx.Variable):
            continue
        own_shape, spec = known
        shape = _shape(module.kernel)
        stack = len(shape) - len(own_shape)
        if stack < 0 or shape[stack:] != own_shape:
            raise ValueError(f"{where}: kernel shape {shape} does not end in the module's own kernel shape {own_shape}; an nnx.vmap stack with out_axes ≠ 0 puts the layer axis elsewhere. Declare this kernel's layout in overrides={{{re.escape(path)!r}: {{'layout': {{...}}}}}}.")
        if targets is None and isinstance(module, nnx.Conv | nnx.ConvTranspose):
            continue  # not a default target (the paper adapts attention and MLP projections)
        regex = rf"{re.escape(path)}(?:/value)?"
        state_paths[regex] = f"{path}/value"
        overrides[regex] = {**_layout(stack + spec["stack_ndim"], tuple(a - spec["stack_ndim"] for a in spec["in_axes"]), tuple(a - spec["stack_ndim"] for a in spec["out_axes"])), **options}
    if not overrides:
        return overrides
    chosen = set(select_targets(nnx.state(model, nnx.Param), targets, exclude, layouts={r: v["layout"] for r, v in overrides.items()}))
    return {regex: value for regex, value in overrides.items() if state_paths[regex] in chosen}
