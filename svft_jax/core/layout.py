"""Kernel layouts: how an N-D parameter is read as a stack of (out × in) matrices W.

SVFT is defined on W ∈ R^{d1×d2} with d1 = outputs, d2 = inputs (the paper's orientation).
A Flax `Dense` kernel is (in, out), so W = kernelᵀ; GPT-2's `FlaxConv1D` stores (out, in);
`DenseGeneral` kernels group several axes on either side; `nn.scan`/`vmap` models add
leading layer axes. A `KernelLayout` records the axes so `to_matrix`/`from_matrix` are exact
inverses.

Never guess a layout. The shape alone cannot tell a scanned (layers, in, out) Dense from a
(in, heads, head_dim) attention projection, nor a 1-D conv (taps, in, out) from either, and a
wrong reading silently trains a different model (per-tap SVDs, or one SVD mixing layers).
`resolve_layout` therefore reads a kernel, in this order, from:

1. a declared layout (`overrides={regex: {"layout": ...}}`: a name in `LAYOUT_NAMES` or a dict
   with `stack_ndim`, `in_axes`, `out_axes`);
2. a 2-D shape: (in, out), as flax `Dense`/`nnx.Linear` store it (GPT-2's (out, in) `Conv1D`
   is declared `"out_in"`, as `svft_jax.models.adapt` does);
3. the path, where flax fixes the convention (the component names flax linen and NNX
   really produce; NNX paths may end in 'kernel/value'):
   - leading stacked axes: one per lifted-module auto-name `Scan<Name>_<n>` / `Vmap<Name>_<n>`
     (what `nn.scan` / `nn.vmap` name an unnamed module; `Checkpoint`/`Remat`/`Jit`
     prefixes add none). A user-chosen scan name (`name="layers"`) and NNX `nnx.vmap` stacks
     leave no mark in the path: declare those (`svft_jax.models.stacked_layouts`,
     `svft_jax.models.nnx_layouts(model)`);
   - attention: `query|key|value` kernels `(*stack, in, heads, head_dim)` and `out`
     `(*stack, heads, head_dim, out)` inside a module whose name says attention (`attn`,
     `attention`, `mha`: flax's `MultiHeadDotProductAttention_0`, `SelfAttention_0`, or an NNX
     attribute such as `self.attn = nnx.MultiHeadAttention(...)`); axes in front of those
     three are stacked layers. Where the scan marks leave exactly two axes, the projection
     is a plain (in, out) Dense;
   - linen `Dense_<n>`: the last two axes are (in, out), any in front are stacked layers;
   - convolutions (a module named `Conv_<n>`, `ConvTranspose_<n>` or containing `conv`): the
     conv's own matrix, W (out, taps·in) ("im2col"), never one SVD per tap. They are left
     out of the default targets (the paper adapts attention and MLP projections), but
     adapted this way when targeted. `ConvLocal` (one matrix per output position) is refused;
4. otherwise ValueError listing every plausible reading, each with the exact `overrides`
   value that picks it: `DenseGeneral_<n>` (its axes split either way), `Einsum_<n>` (its
   axes may come in any order) and any ≥ 3-D kernel under a name with no known convention.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from svft_jax._paths import compile_regex

# Named layouts users may pass as overrides={regex: {"layout": NAME}}: fixed-rank ones...
NAMED_LAYOUTS: dict[str, dict] = {
    "in_out": dict(stack_ndim=0, in_axes=(0,), out_axes=(1,)),  # flax Dense (in, out)
    "out_in": dict(stack_ndim=0, in_axes=(1,), out_axes=(0,)),  # GPT-2 FlaxConv1D (out, in)
    "stacked_in_out": dict(stack_ndim=1, in_axes=(1,), out_axes=(2,)),  # nn.scan Dense
}
# ... and ones that fit any number of axes (leading stacked axes, or any spatial rank).
_RANK_FREE_LAYOUTS: dict[str, Callable[[int], dict]] = {
    # flax attention query/key/value (*stack, in, heads, head_dim): W (heads·head_dim × in)
    "attention_qkv": lambda n: dict(stack_ndim=n - 3, in_axes=(n - 3,), out_axes=(n - 2, n - 1)),
    # flax attention out (*stack, heads, head_dim, out): W (out × heads·head_dim)
    "attention_out": lambda n: dict(stack_ndim=n - 3, in_axes=(n - 3, n - 2), out_axes=(n - 1,)),
    # flax Conv (*taps, in, out): W (out × taps·in), the convolution's own (im2col) matrix
    "conv": lambda n: dict(stack_ndim=0, in_axes=tuple(range(n - 1)), out_axes=(n - 1,)),
}
_MIN_NDIM = {"attention_qkv": 3, "attention_out": 3, "conv": 2}
LAYOUT_NAMES: tuple[str, ...] = (*NAMED_LAYOUTS, *_RANK_FREE_LAYOUTS)


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




def _named_spec(name: str, ndim: int) -> dict:
    if name in NAMED_LAYOUTS:
        return NAMED_LAYOUTS[name]
    if name in _RANK_FREE_LAYOUTS:
        if ndim < _MIN_NDIM[name]:
            raise ValueError(f"layout {name!r} needs a kernel with at least {_MIN_NDIM[name]} axes, got {ndim}")
        return _RANK_FREE_LAYOUTS[name](ndim)
    raise ValueError(f"unknown layout {name!r}; known: {list(LAYOUT_NAMES)} (or a dict with 'stack_ndim', 'in_axes', 'out_axes')")


# --- what the path says ------------------------------------------------------------------------

# flax linen names an unnamed lifted module after its transforms and class: nn.scan(Block) ->
# 'ScanBlock_0', nn.remat(nn.scan(Block)) -> 'CheckpointScanBlock_0', nn.vmap(nn.Dense) ->
# 'VmapDense_0'. Each Scan/Vmap adds one leading (variable_axes=0) axis to every kernel inside.
_LIFTED_NAME = re.compile(r"((?:Scan|Vmap|Checkpoint|Remat|Jit)+)(_?[A-Z]\w*_\d+)")
_STACKING_LIFTS = re.compile(r"Scan|Vmap")
_ATTENTION_MODULE = re.compile(r"(?i).*(attn|attention|mha).*")
_CONV_MODULE = re.compile(r"(?i)(?!.*convlocal).*conv.*")


@dataclasses.dataclass(frozen=True)
class _PathEvidence:
    """What a parameter path says about its kernel: `kind` of module and marked stack axes."""

    kind: str  # dense | attention_qkv | attention_out | dense_general | einsum | conv | conv_local | unknown
    stack_ndim: int
    reason: str  # why the path does not settle the layout, for `unknown`-like kinds


def _components(path: str) -> list[str]:
    components = path.split("/")
    if components[-2:] == ["kernel", "value"]:  # NNX State: the Param's value under its name
        components = components[:-1]
    return components


def _unlifted(name: str) -> tuple[str, int]:
    """'ScanDense_0' -> ('Dense_0', 1): the class auto-name and the stack axes the lifts add."""
    match = _LIFTED_NAME.fullmatch(name)
    if match is None:
        return name, 0
    return match.group(2), len(_STACKING_LIFTS.findall(match.group(1)))


def _path_evidence(path: str | None) -> _PathEvidence:
    if path is None:
        return _PathEvidence("unknown", 0, "no parameter path was given")
    components = _components(path)
    modules = components[:-1]  # the leaf name ('kernel') is not a module
    stack_ndim = sum(_unlifted(name)[1] for name in modules)
    module = _unlifted(modules[-1])[0] if modules else ""
    parent = _unlifted(modules[-2])[0] if len(modules) >= 2 else ""
    if module in ("query", "key", "value") and _ATTENTION_MODULE.fullmatch(parent):
        return _PathEvidence("attention_qkv", stack_ndim, "")
    if module == "out" and _ATTENTION_MODULE.fullmatch(parent):
        return _PathEvidence("attention_out", stack_ndim, "")
    if re.fullmatch(r"Dense_\d+", module):
        return _PathEvidence("dense", stack_ndim, "")
    if re.fullmatch(r"DenseGeneral_\d+", module):
        return _PathEvidence("dense_general", stack_ndim, f"flax DenseGeneral ({module!r}) may group its axes into inputs and outputs either way")
    if re.fullmatch(r"Einsum_\d+", module):
        return _PathEvidence("einsum", stack_ndim, f"an Einsum kernel ({module!r}) may order its axes any way its einsum string says")
    if re.fullmatch(r"(?i).*convlocal.*", module):
        return _PathEvidence("conv_local", stack_ndim, f"a ConvLocal kernel ({module!r}) holds one matrix per output position")
    if _CONV_MODULE.fullmatch(module):
        return _PathEvidence("conv", stack_ndim, "")
    where = f"module {module!r}" if module else "the path"
    return _PathEvidence("unknown", stack_ndim, f"{where} has no layout convention svft-jax knows")


def _readings(ndim: int, min_stack: int, both_orders: bool) -> list[dict]:
    """Every layout with ≥ `min_stack` leading stacked axes whose other axes are one contiguous
    run of inputs then one of outputs (flax's order; `both_orders` adds outputs-then-inputs)."""
    readings = []
    for stack_ndim in range(min_stack, ndim - 1):
        axes = tuple(range(stack_ndim, ndim))
        for cut in range(1, len(axes)):
            readings.append(dict(stack_ndim=stack_ndim, in_axes=axes[:cut], out_axes=axes[cut:]))
            if both_orders:
                readings.append(dict(stack_ndim=stack_ndim, in_axes=axes[cut:], out_axes=axes[:cut]))
    return readings


def _stacked(stack_ndim: int, in_axes: Iterable[int], out_axes: Iterable[int]) -> dict:
    shift = lambda axes: tuple(a + stack_ndim for a in axes)  # noqa: E731
    return dict(stack_ndim=stack_ndim, in_axes=shift(in_axes), out_axes=shift(out_axes))


def layout_readings(shape, path: str | None = None) -> list[dict]:
    """The plausible layouts of an undeclared kernel, given its shape and parameter path.

    Args:
      shape: the kernel's shape (≥ 2 axes).
      path: its '/'-joined parameter path (e.g. 'blocks/attn/query/kernel'), or None.

    Returns:
      A list of layout dicts (`stack_ndim`, `in_axes`, `out_axes`); exactly one when the
      shape and path settle the layout (see the module docstring for the rules), several
      when they do not, none for a kernel flax never stores this way (a 1-D leaf).
    """
    ndim = len(shape)
    if ndim < 2:
        return []
    evidence = _path_evidence(path)
    if ndim == 2:
        if evidence.kind == "einsum":
            return [NAMED_LAYOUTS["in_out"], NAMED_LAYOUTS["out_in"]]
        return [NAMED_LAYOUTS["in_out"]]
    stack = evidence.stack_ndim
    if stack > ndim - 2:  # the marks do not fit this kernel (e.g. a user class named 'ScanX')
        return _readings(ndim, 0, both_orders=False)
    kind = evidence.kind
    if kind in ("attention_qkv", "attention_out"):
        if ndim - stack == 2:  # a scanned attention whose projections are plain Dense kernels
            return [_stacked(stack, (0,), (1,))]
        return [_named_spec(kind, ndim)]
    if kind == "dense":
        return [_stacked(ndim - 2, (0,), (1,))]
    if kind == "conv":
        return [_stacked(stack, range(ndim - stack - 1), (ndim - stack - 1,))]
    if kind in ("unknown", "dense_general") and ndim - stack == 2:
        return [_stacked(stack, (0,), (1,))]
    return _readings(ndim, stack, both_orders=kind == "einsum")


def _layout_name(shape, spec: Mapping) -> str | None:
    """The fixed-rank name in NAMED_LAYOUTS that means exactly `spec`, if any (the rank-free
    names are not offered: 'attention_qkv' for a kernel of unknown origin would mislead)."""
    for name, named in NAMED_LAYOUTS.items():
        if len(shape) != 2 + named["stack_ndim"]:
            continue
        if all(tuple(np.atleast_1d(named[key])) == tuple(np.atleast_1d(spec[key])) for key in ("stack_ndim", "in_axes", "out_axes")):
            return name
    return None


def _describe(shape, spec: Mapping) -> str:
    layout = _layout_from_spec(shape, "float32", spec)
    sizes = lambda axes: "·".join(str(shape[a]) for a in axes)  # noqa: E731
    matrix = f"W {layout.d1}×{layout.d2} (out = axes {layout.out_axes}: {sizes(layout.out_axes)}; in = axes {layout.in_axes}: {sizes(layout.in_axes)})"
    if not layout.stack_ndim:
        return f"one {matrix}"
    layers = math.prod(layout.stack_shape)
    return f"a stack of {layers} (axes {tuple(range(layout.stack_ndim))}), one SVD each, of {matrix}"


def _override_value(path: str | None, shape, spec: Mapping) -> str:
    regex = re.escape(path) if path is not None else "<regex of this kernel's path>"
    name = _layout_name(shape, spec)
    value = repr(name) if name is not None else repr({k: spec[k] for k in ("stack_ndim", "in_axes", "out_axes")})
    return f"overrides={{{regex!r}: {{'layout': {value}}}}}"


def resolve_layout(shape, dtype, declared=None, *, path: str | None = None) -> KernelLayout:
    """The layout of a kernel: `declared` if given, else read from its shape and path.

    Never guesses and never returns None: a kernel whose in/out axes the shape and path do
    not settle (see the module docstring for the rules) raises a ValueError that lists every
    plausible reading with the exact `overrides` value that picks it.

    Args:
      shape: the kernel's shape.
      dtype: its dtype (name or object; recorded so merge casts back to it).
      declared: a name in `LAYOUT_NAMES`, a dict with `stack_ndim`, `in_axes`, `out_axes`, or
        None.
      path: the kernel's '/'-joined parameter path ('MultiHeadDotProductAttention_0/query/
        kernel', 'attn/query/kernel/value'); None reads the shape alone (2-D only).

    Returns:
      A hashable `KernelLayout`.

    Raises:
      ValueError: for a declared layout that does not fit the shape, a kernel with < 2 axes,
        or an ambiguous kernel (the message names the path and lists the readings).
    """
    shape = tuple(int(s) for s in shape)
    where = f"kernel {path!r}" if path is not None else "kernel"
    if declared is not None:
        if isinstance(declared, str):
            declared = _named_spec(declared, len(shape))
        if not isinstance(declared, Mapping):
            raise ValueError(
                f"layout must be one of {list(LAYOUT_NAMES)} or a dict with 'stack_ndim', "
                f"'in_axes', 'out_axes', got {declared!r}"
            )
        return _layout_from_spec(shape, dtype, declared)
    readings = layout_readings(shape, path)
    if len(readings) == 1:
        return _layout_from_spec(shape, dtype, readings[0])
    if not readings:
        raise ValueError(f"{where} has shape {shape}; SVFT needs a kernel with at least 2 axes")
    options = "\n".join(
        f"  ({chr(ord('a') + i)}) {_describe(shape, spec)}:\n      {_override_value(path, shape, spec)}"
        for i, spec in enumerate(readings)
    )
    raise ValueError(
        f"{where} of shape {shape}: its input/output axes cannot be read from the shape and path "
        f"({_path_evidence(path).reason}), and svft-jax does not guess. Plausible readings:\n{options}\n"
        "Declare the right one (svft_jax.models.attention_layouts, stacked_layouts and "
        "nnx_layouts(model) write such overrides for whole models), or leave the kernel out "
        "with exclude=."
    )


# --- target selection helpers ------------------------------------------------------------------

def layout_candidates(path: str, shape) -> bool:
    """Whether default targets (targets=None) consider this kernel: ≥ 2 axes and not a conv.

    Cheap (no layout is resolved). An ambiguous kernel IS a candidate, so `apply` refuses it
    with the readings instead of silently leaving it out; convolutions are not (the paper
    adapts attention and MLP projections), though they can be targeted by name.

    Args:
      path: '/'-joined parameter path.
      shape: the leaf's shape.
    """
    if len(shape) < 2:
        return False
    # A flax conv kernel has ≥ 3 axes (taps, in, out); a 2-D kernel under a 'conv' name is a
    # Dense-like matrix (GPT-2's Conv1D), a projection like any other.
    return len(shape) == 2 or _path_evidence(path).kind not in ("conv", "conv_local")


def declared_layout(path: str, overrides) -> str | dict | None:
    """The layout `overrides` declares for `path`: the first regex that fully matches wins
    (as for every other option in `svft_jax.apply`); None when that entry sets no layout or
    no regex matches.

    `select_targets` uses it so a kernel whose layout is declared is a target even where the
    default rules would leave it out (a declared conv, for instance).

    Args:
      path: '/'-joined parameter path.
      overrides: {regex: {option: value}} as passed to `apply`, or an iterable of
        (compiled regex or string, options) pairs.
    """
    items = overrides.items() if isinstance(overrides, Mapping) else (overrides or ())
    for regex, values in items:
        compiled = compile_regex(regex, f"overrides key {regex!r}") if isinstance(regex, str) else regex
        if compiled.fullmatch(path) is not None:
            return values.get("layout") if isinstance(values, Mapping) else None
    return None
