"""Shared machinery of the baselines: target planning, seeded draws, the common node base.

Every baseline picks its targets with the core's rules (`svft_jax.select_targets`: the same
regexes, the same default of "every 2-D/N-D kernel outside embeddings, norms, biases and
heads") and reads kernels through the core's `KernelLayout`, so a GPT-2 `(out, in)` kernel, a
`DenseGeneral` kernel or a stacked `nn.scan` kernel is adapted the same way SVFT adapts it.
All matrices here use the paper's orientation W: (*stack, d1 = out, d2 = in).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax._paths import compile_regex, matches, path_to_str
from svft_jax.transform.apply import select_targets
from svft_jax.transform.layout import KernelLayout, resolve_layout
from svft_jax.transform.node import AdapterNode

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Target:
    """One kernel chosen for adaptation: its path, the original leaf and its layout."""

    path: str
    kernel: Any
    layout: KernelLayout

    @property
    def key_id(self) -> int:
        """A platform-independent id of the path, folded into seeded draws."""
        return zlib.crc32(self.path.encode()) & 0x7FFFFFFF


def plan_targets(params, targets: str | None, exclude: str | None, layouts: Mapping[str, Any] | None = None) -> list[Target]:
    """The kernels a baseline adapts, checked before any array is created.

    Args:
      params: the parameter pytree.
      targets, exclude: regexes as in `svft_jax.apply`.
      layouts: optional {regex: layout} (a name from `NAMED_LAYOUTS` or a dict) for kernels
        whose axes cannot be inferred, e.g. {'.*c_attn/kernel': 'out_in'} for GPT-2.
    Returns:
      A list of `Target`s in pytree order.
    Raises:
      ValueError/TypeError naming the parameter path.
    """
    compiled = [(compile_regex(r, f"layouts key {r!r}"), v) for r, v in (layouts or {}).items()]
    leaves = {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    chosen = []
    for path in select_targets(params, targets, exclude):
        leaf = leaves[path]
        where = f"parameter {path!r}"
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"{where} was chosen as a target but is a {type(leaf).__name__}, not an array.")
        if not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.ndim < 2:
            raise ValueError(f"{where} has shape {tuple(leaf.shape)} and dtype {leaf.dtype}; only floating kernels with ≥ 2 axes can be adapted. Narrow `targets` or add it to `exclude`.")
        if not bool(jnp.all(jnp.isfinite(leaf))):
            raise ValueError(f"{where} contains NaN or Inf; fix the checkpoint before adapting it.")
        declared = next((v for r, v in compiled if matches(r, path)), None)
        try:
            layout = resolve_layout(leaf.shape, jnp.dtype(leaf.dtype).name, declared)
        except ValueError as err:
            raise ValueError(f"{where}: {err}.") from err
        if layout is None:
            raise ValueError(f"{where} has shape {tuple(leaf.shape)} whose input/output axes cannot be inferred; declare them with layouts={{{path!r}: {{'stack_ndim': ..., 'in_axes': (...), 'out_axes': (...)}}}}.")
        chosen.append(Target(path, leaf, layout))
    return chosen


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return int(value)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
    return int(seed)


def kaiming_uniform(key, shape, fan_in: int):
    """PyTorch's `nn.Linear` default (kaiming_uniform with a=√5): U(−1/√fan_in, 1/√fan_in).

    This is what PEFT uses for LoRA's A (and VeRA's frozen A, B), so runs are comparable
    with the PyTorch reference implementations.
    """
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def replace_targets(params, nodes: Mapping[str, AdapterNode]):
    """`params` with each path in `nodes` replaced by its node; other leaves untouched."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: nodes.get(path_to_str(path), leaf), params)


def shape_text(layout: KernelLayout) -> str:
    stack = "×".join(map(str, layout.stack_shape))
    return f"{stack + '×' if stack else ''}{layout.d1}×{layout.d2}"


def layers(layout: KernelLayout) -> int:
    return int(np.prod(layout.stack_shape, dtype=int))


def low_rank_product(b, a):
    """B A for (*stack, d1, r) × (*stack, r, d2) in float32 at full precision."""
    return jnp.matmul(jnp.asarray(b, jnp.float32), jnp.asarray(a, jnp.float32), precision=_HIGHEST)


def add_delta(base, layout: KernelLayout, delta):
    """W0 + ΔW in the kernel's own layout and dtype (ΔW: (*stack, d1, d2), float32)."""
    merged = jnp.asarray(base, jnp.float32) + layout.from_matrix(delta)
    return merged.astype(layout.dtype)
