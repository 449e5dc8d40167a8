"""Explicit kernel layouts for Flax linen / NNX models whose shapes are ambiguous.

`svft_jax.apply` infers a kernel's layout from its shape. Two common cases cannot always be
told apart from the shape alone:

* attention `DenseGeneral`/`LinearGeneral` kernels — query/key/value (in, heads, head_dim),
  out (heads, head_dim, out) — are recognised only when in = heads·head_dim (resp.
  out = heads·head_dim); otherwise a 3-D kernel is read as a stack of 2-D matrices;
* `nn.scan`/`nnx.vmap` layer stacks (layers, in, out) are misread as a `DenseGeneral` when
  out happens to equal layers·in (e.g. 2 layers of 16 → 32).

These helpers return `overrides` for `svft_jax.apply` that declare the layout instead.
Overrides are matched first-to-last and the first match wins, so put the more specific
dict first: `{**attention_layouts(stack_ndim=1), **stacked_layouts()}`.
"""

from __future__ import annotations

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
