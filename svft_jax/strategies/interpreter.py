"""A jaxpr interpreter that runs a model with adapter nodes in place of their kernels.

The model is traced once with a placeholder for each adapted kernel, then its jaxpr is
evaluated equation by equation (as lorax and qax do). A placeholder's value is a
`KernelProxy`: transposes and dtype casts of the kernel are recorded on the proxy; a
`dot_general` that contracts the proxy is handed to the node's strategy (which may never
form W); any other use of the kernel — a scan over stacked layers, a reshape, a custom
derivative rule — gets the dense kernel (merged once per call, or by the strategy).
Everything else is re-bound unchanged, so `jit`, `grad`, `vmap` and sharding see ordinary
JAX operations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Literal

# Primitives that only relabel the kernel, followed on the proxy without touching data.
_PASS_THROUGH = ("copy", "copy_p", "optimization_barrier")
# Call-like primitives whose body we interpret with proxies inside (they only inline jit).
_CALLS = ("pjit", "jit", "closed_call", "core_call")


@dataclasses.dataclass
class KernelProxy:
    """A target kernel seen through transposes and casts.

    Attributes:
      node: the adapter node (its arrays are the caller's values: tracers under jit/grad).
      path: '/'-joined parameter path.
      strategy: the strategy function chosen for this target, `(node, use) -> y`.
      permutation: axis i of the current kernel is axis permutation[i] of the original kernel.
      dtype: the current kernel dtype (after convert_element_type).
      cache: per-call memo shared by every view of this kernel (e.g. the merged kernel, so a
        rebuild happens once per call even when the kernel is used twice).
    """

    node: Any
    path: str
    strategy: Callable
    permutation: tuple[int, ...]
    dtype: Any
    cache: dict

    def view(self, **changes) -> KernelProxy:
        return dataclasses.replace(self, **changes)

    def materialize(self, kernel):
        """The original-layout `kernel` seen through this proxy's transposes and cast."""
        if self.permutation != tuple(range(len(self.permutation))):
            kernel = jnp.transpose(kernel, self.permutation)
        return kernel.astype(self.dtype)

    def merged(self):
        """The dense adapted kernel (original layout), merged once per call."""
        if "merged" not in self.cache:
            self.cache.setdefault("used", []).append("rebuild")
            self.cache["merged"] = self.node.materialize()
        return self.materialize(self.cache["merged"])


@dataclasses.dataclass
class KernelUse:
    """One `dot_general` that contracts an adapted kernel with an activation.

    A strategy reads `tokens`, calls `dense(kernel)` to run the original dot with any
    kernel, or, when `matrix_form` is True, `input_matrix()` -> x: (..., d2) and
    `output_from_matrix(y: (..., d1))` to run its own factored product.
    """

    proxy: KernelProxy
    x: Any
    kernel_is_lhs: bool
    params: dict
    out_dtype: Any

    @property
    def _dims(self):
        (lhs_c, rhs_c), (lhs_b, rhs_b) = self.params["dimension_numbers"]
        if self.kernel_is_lhs:
            return tuple(rhs_c), tuple(lhs_c), tuple(rhs_b), tuple(lhs_b)
        return tuple(lhs_c), tuple(rhs_c), tuple(lhs_b), tuple(rhs_b)

    @property
    def x_free_dims(self) -> tuple[int, ...]:
        x_c, _, x_b, _ = self._dims
        return tuple(i for i in range(self.x.ndim) if i not in x_c and i not in x_b)

    @property
    def tokens(self) -> int:
        """Rows of x per call: the product of x's non-contracted dims."""
        return int(math.prod(self.x.shape[i] for i in self.x_free_dims))

    @property
    def layout(self):
        return self.proxy.node.meta.layout

    @property
    def matrix_form(self) -> bool:
        """Whether this dot is x ↦ x Wᵀ over exactly W's input axes (so it can be factored)."""
        x_c, k_c, x_b, k_b = self._dims
        if x_b or k_b or self.layout.stack_ndim:
            return False
        original = tuple(self.proxy.permutation[i] for i in k_c)
        return sorted(original) == sorted(self.layout.in_axes)

    def dense(self, kernel):
        """The original dot_general with `kernel` (original layout) in place of the proxy."""
        return self.dense_kernel_view(self.proxy.materialize(kernel))

    def dense_merged(self):
        """The original dot with the merged kernel (merged once per call, see KernelProxy)."""
        return self.dense_kernel_view(self.proxy.merged())

    def dense_kernel_view(self, operand):
        operands = (operand, self.x) if self.kernel_is_lhs else (self.x, operand)
        return jax.lax.dot_general_p.bind(*operands, **self.params)

    def record(self, name: str) -> None:
        """Note which strategy actually ran this dot (read back by `wrap(...).last_plan`)."""
        self.proxy.cache.setdefault("used", []).append(name)

    def with_x(self, x) -> KernelUse:
        return dataclasses.replace(self, x=x)

    def input_matrix(self):
        """x with its contracted axes moved last in W's input order: (*free, d2)."""
        x_c, k_c, _, _ = self._dims
        by_original_axis = {self.proxy.permutation[k]: xc for xc, k in zip(x_c, k_c, strict=True)}
        ordered = [by_original_axis[axis] for axis in self.layout.in_axes]
        free = self.x_free_dims
        x = jnp.transpose(self.x, (*free, *ordered)) if (*free, *ordered) != tuple(range(self.x.ndim)) else self.x
        return x.reshape(*(self.x.shape[i] for i in free), self.layout.d2)

    def output_from_matrix(self, y):
        """(*free, d1) -> the original dot's output (axes in its order, its dtype)."""
        _, k_c, _, _ = self._dims
        layout = self.layout
        free_shape = tuple(self.x.shape[i] for i in self.x_free_dims)
        y = y.reshape(*free_shape, *(layout.shape[a] for a in layout.out_axes))
        n_free = len(free_shape)
        # Kernel free axes in the dot's output order are the proxy's non-contracted axes.
        kernel_free = [self.proxy.permutation[i] for i in range(len(self.proxy.permutation)) if i not in k_c]
        position = {axis: n_free + j for j, axis in enumerate(layout.out_axes)}
        kernel_axes = [position[a] for a in kernel_free]
        order = (*kernel_axes, *range(n_free)) if self.kernel_is_lhs else (*range(n_free), *kernel_axes)
        if order != tuple(range(y.ndim)):
            y = jnp.transpose(y, order)
        return y.astype(self.out_dtype)

    @property
    def precision(self):
        return self.params.get("precision")


def _is_proxy(value) -> bool:
    return isinstance(value, KernelProxy)


def _dense_value(value):
    return value.merged() if _is_proxy(value) else value


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        return eqn.primitive.bind(*invals, **params)


def _eval_eqn(eqn, invals):
    """Evaluate one equation where some inputs may be proxies. Returns a list of outputs."""
    name = eqn.primitive.name
    proxies = [i for i, v in enumerate(invals) if _is_proxy(v)]
    if proxies:
        if name == "transpose":
            proxy = invals[0]
            permutation = tuple(proxy.permutation[i] for i in eqn.params["permutation"])
            return [proxy.view(permutation=permutation)]
        if name == "convert_element_type" and jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
            return [invals[0].view(dtype=eqn.params["new_dtype"])]
        if name in _PASS_THROUGH and len(invals) == 1:
            return [invals[0]]
        if name == "dot_general" and len(proxies) == 1:
            index = proxies[0]
            proxy, x = invals[index], invals[1 - index]
            use = KernelUse(proxy, x, kernel_is_lhs=index == 0, params=dict(eqn.params),
                           out_dtype=eqn.outvars[0].aval.dtype)
            return [proxy.strategy(proxy.node, use)]
        if name in _CALLS and isinstance(eqn.params.get("jaxpr"), ClosedJaxpr):
            inner = eqn.params["jaxpr"]
            return interpret(inner.jaxpr, inner.consts, invals)
        invals = [_dense_value(v) for v in invals]  # anything else sees the dense kernel
    out = _bind(eqn, invals)
    return list(out) if eqn.primitive.multiple_results else [out]


def interpret(jaxpr, consts, args) -> list:
    """Evaluate `jaxpr` on `args`, some of which may be `KernelProxy`s."""
    env: dict = {}

    def read(var):
        return var.val if isinstance(var, Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        outs = _eval_eqn(eqn, [read(v) for v in eqn.invars])
        for var, value in zip(eqn.outvars, outs, strict=True):
            env[var] = value
    return [_dense_value(read(v)) for v in jaxpr.outvars]


def is_array(x) -> bool:
    """Leaves traced as inputs (arrays and tracers); everything else is static."""
    return isinstance(x, jax.Array | np.ndarray | np.generic)
