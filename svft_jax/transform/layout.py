"""Kernel layouts: how an N-D parameter is read as a stack of (out × in) matrices W.

SVFT is defined on W ∈ R^{d1×d2} with d1 = outputs, d2 = inputs (the paper's orientation).
A Flax `Dense` kernel is (in, out), so W = kernelᵀ; GPT-2's `FlaxConv1D` stores (out, in);
`DenseGeneral` kernels group several axes on either side; `nn.scan`/`vmap` models add
leading layer axes. A `KernelLayout` records the axes so `to_matrix`/`from_matrix` are exact
inverses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

# Named layouts users may pass as overrides={regex: {"layout": NAME}}.
NAMED_LAYOUTS: dict[str, dict] = {
    "in_out": dict(stack_ndim=0, in_axes=(0,), out_axes=(1,)),  # flax Dense (in, out)
    "out_in": dict(stack_ndim=0, in_axes=(1,), out_axes=(0,)),  # GPT-2 FlaxConv1D (out, in)
    "stacked_in_out": dict(stack_ndim=1, in_axes=(1,), out_axes=(2,)),  # nn.scan Dense
}


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """Where a kernel's stacked, input and output axes are. Hashable (jit-static).

    Attributes:
      shape: the kernel's shape.
      dtype: the kernel's dtype name (merge casts back to it).
      stack_ndim: number of leading stacked-layer axes (each layer gets its own SVD).
      in_axes: axes (of the full kernel) flattened into d2, in order.
      out_axes: axes flattened into d1, in order.
    """

    shape: tuple[int, ...]
    dtype: str
    stack_ndim: int
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return self.shape[: self.stack_ndim]

    @property
    def d1(self) -> int:
        return math.prod(self.shape[a] for a in self.out_axes)

    @property
    def d2(self) -> int:
        return math.prod(self.shape[a] for a in self.in_axes)

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """(*stack, d1, d2)."""
        return (*self.stack_shape, self.d1, self.d2)

    def _permutation(self) -> tuple[int, ...]:
        return (*range(self.stack_ndim), *self.out_axes, *self.in_axes)

    def to_matrix(self, kernel):
        """kernel (shape) -> W (*stack, d1, d2). Works on numpy and jax arrays."""
        return kernel.transpose(self._permutation()).reshape(self.matrix_shape)

    def from_matrix(self, matrix):
        """W (*stack, d1, d2) -> kernel (shape); the inverse of `to_matrix`."""
        permutation = self._permutation()
        permuted_shape = tuple(self.shape[a] for a in permutation)
        return matrix.reshape(permuted_shape).transpose(np.argsort(permutation))


def _axes(spec: Mapping, name: str, ndim: int) -> tuple[int, ...]:
    """spec[name] as a tuple of non-negative axes; ValueError (not KeyError/TypeError from deep
    inside) when it is missing or not a sequence of ints, so `apply` can name the parameter."""
    if name not in spec:
        raise ValueError(f"layout dict needs {name!r} (a tuple of axes), got keys {sorted(spec)}")
    axes = spec[name]
    if isinstance(axes, int | np.integer):
        axes = (axes,)
    if not isinstance(axes, tuple | list) or not all(
        isinstance(a, int | np.integer) and not isinstance(a, bool) for a in axes
    ):
        raise ValueError(f"layout {name!r} must be a tuple of ints, got {axes!r}")
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(f"layout {name}={tuple(axes)} has an axis out of range for a {ndim}-D kernel")
    return tuple(int(a) % ndim for a in axes)


def _layout_from_spec(shape, dtype, spec: Mapping) -> KernelLayout:
    unknown = set(spec) - {"stack_ndim", "in_axes", "out_axes"}
    if unknown:
        raise ValueError(f"unknown layout keys {sorted(unknown)}")
    stack_ndim = spec.get("stack_ndim", 0)
    if isinstance(stack_ndim, bool) or not isinstance(stack_ndim, int | np.integer) or not 0 <= stack_ndim <= len(shape) - 2:
        raise ValueError(f"layout stack_ndim must be an int in [0, {len(shape) - 2}] for a kernel of shape {tuple(shape)}, got {stack_ndim!r}")
    stack_ndim = int(stack_ndim)
    in_axes = _axes(spec, "in_axes", len(shape))
    out_axes = _axes(spec, "out_axes", len(shape))
    expected = set(range(stack_ndim, len(shape)))
    if sorted(in_axes + out_axes) != sorted(expected) or len(in_axes + out_axes) != len(expected):
        raise ValueError(
            f"in_axes={in_axes} and out_axes={out_axes} must split the non-stacked axes "
            f"{sorted(expected)} of a kernel of shape {tuple(shape)} exactly once each"
        )
    if not in_axes or not out_axes:
        raise ValueError("in_axes and out_axes must both be non-empty")
    return KernelLayout(tuple(shape), str(dtype), stack_ndim, in_axes, out_axes)


def _infer_spec(shape: tuple[int, ...]) -> dict | None:
    """Guess the layout of an undeclared kernel, or None when it is ambiguous.

    2-D: Dense (in, out). 3-D: DenseGeneral (in, heads, head_dim) when in = heads·head_dim,
    (heads, head_dim, out) when out = heads·head_dim, else a stack of Dense (layers, in, out).
    4-D: one leading layer axis in front of the 3-D DenseGeneral rules.
    """
    if len(shape) == 2:
        return NAMED_LAYOUTS["in_out"]
    if len(shape) in (3, 4):
        stack = len(shape) - 3
        a, b, c = shape[stack:]
        if a == b * c:
            return dict(stack_ndim=stack, in_axes=(stack,), out_axes=(stack + 1, stack + 2))
        if c == a * b:
            return dict(stack_ndim=stack, in_axes=(stack, stack + 1), out_axes=(stack + 2,))
        if stack == 0:
            return NAMED_LAYOUTS["stacked_in_out"]
    return None


def resolve_layout(shape, dtype, declared=None) -> KernelLayout | None:
    """The layout of a kernel: `declared` (a name from NAMED_LAYOUTS or a dict), else inferred.

    Returns None when nothing is declared and the shape is ambiguous. Raises ValueError for a
    declared layout that does not fit the shape.
    """
    shape = tuple(int(s) for s in shape)
    if declared is None:
        spec = _infer_spec(shape)
        return None if spec is None else _layout_from_spec(shape, dtype, spec)
    if isinstance(declared, str):
        if declared not in NAMED_LAYOUTS:
            raise ValueError(f"unknown layout {declared!r}; known: {sorted(NAMED_LAYOUTS)}")
        declared = NAMED_LAYOUTS[declared]
    if not isinstance(declared, Mapping):
        raise ValueError(
            f"layout must be one of {sorted(NAMED_LAYOUTS)} or a dict with 'stack_ndim', "
            f"'in_axes', 'out_axes', got {declared!r}"
        )
    return _layout_from_spec(shape, dtype, declared)
