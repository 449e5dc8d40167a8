"""A jaxpr interpreter that runs a model with adapter nodes in place of their kernels.

The model is traced once with a placeholder for each adapted kernel, then its jaxpr is
evaluated equation by equation (as lorax and qax do). A placeholder's value is a
`KernelProxy`: transposes and dtype casts of the kernel are recorded on the proxy; a
`dot_general` that contracts the proxy is handed to the node's strategy (which may never
form W). Bodies of control flow are followed with proxies inside, re-expressed with JAX's
public API so `jit`, `grad`, `vmap` and sharding see ordinary operations:

  jit / closed_call        interpreted inline.
  slice/dynamic_slice      one layer indexed out of a stacked kernel (`w[i]` in a Python or
    + squeeze              `fori_loop` over stacked weights) becomes that layer's node.
  batched dot_general      a dot batched over the stack axis (`nn.vmap` layers, experts'
                           `einsum('lbi,lio->lbo')`) runs the strategy per layer under vmap.
  scan                     a kernel passed as `xs` (stacked layers, e.g. flax `nn.scan`) is
                           sliced per iteration into a per-layer node (`layer_slicer`); a
                           kernel closed over, or carried unchanged, keeps its proxy.
  checkpoint (remat)       `jax.checkpoint` of the interpreted body, nodes as arguments, so the
                           strategy's intermediates are recomputed in the backward pass.
  cond, while              `lax.switch` / `lax.while_loop` over interpreted bodies.
  custom_vjp / custom_jvp  the primal runs the interpreted body (the strategy); derivatives
                           run the user's rule, which is defined on the dense kernel, on the
                           merged kernel, and the kernel's cotangent/tangent is mapped to the
                           node's by JAX. custom_vjp: the forward pass keeps the strategy, the
                           backward re-runs the user's forward on the merged kernel (as remat
                           would) before its bwd. custom_jvp under differentiation: the rule
                           (primal and tangent) runs on the merged kernel. The plan describes
                           the forward call (what `plan()` traces), not these rules.

Every other use of a kernel gets the dense merged kernel and is reported by a
`FallbackWarning` (or a `FallbackError` under `wrap(..., strict=True)`) naming the target,
the primitive and the reason.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax.errors import FallbackError, FallbackWarning
from svft_jax.strategies import _jaxpr
from svft_jax.strategies._jaxpr import Literal

# Primitives that only relabel the kernel, followed on the proxy without touching data.
_PASS_THROUGH = ("copy", "copy_p", "optimization_barrier")
# Strategies whose whole point is the dense kernel: their merges are choices, not fallbacks.
_DENSE_STRATEGIES = ("rebuild", "rebuild_remat")


@dataclasses.dataclass
class CallContext:
    """State of one interpreted call, shared by every proxy in it (and in its bodies).

    Attributes:
      strict: raise `FallbackError` instead of warning.
      plan: {path: [strategy names that ran this target's uses, first-seen order]}.
    """

    strict: bool = False
    plan: dict = dataclasses.field(default_factory=dict)

    def record(self, path: str, name: str) -> None:
        used = self.plan.setdefault(path, [])
        if name not in used:
            used.append(name)

    def fallback(self, path: str, strategy: str, primitive: str, why: str) -> None:
        message = (
            f"wrap: target {path!r} (strategy {strategy!r}) falls back to the dense merged kernel "
            f"at primitive {primitive!r}: {why}. The result is the merged model's; only speed and "
            f"memory differ. Force strategy 'rebuild' for this path with overrides= to silence "
            f"this, or restructure the model so the kernel meets a dot_general."
        )
        if self.strict:
            raise FallbackError(message)
        warnings.warn(message, FallbackWarning, stacklevel=2)


@dataclasses.dataclass
class KernelProxy:
    """A target kernel seen through transposes and casts.

    Attributes:
      node: the adapter node (its arrays are the caller's values: tracers under jit/grad).
      path: '/'-joined parameter path.
      strategy: the strategy function chosen for this target, `(node, use) -> y`.
      permutation: axis i of the current kernel is axis permutation[i] of the original kernel.
      dtype: the current kernel dtype (after convert_element_type).
      memo: per-scope memo shared by every view of this kernel (the merged kernel, so a
        rebuild happens once per call even when the kernel is used twice). A body of control
        flow gets a fresh memo, so no tracer of one trace leaks into another.
      strategy_name: the registered name of `strategy` (for the plan and messages).
      context: the call's `CallContext` (plan, strict mode).
      pending_layer: True for one layer indexed out of a stacked kernel (`slice` or
        `dynamic_slice` of size 1 on the stack axis) before its `squeeze`: `node` is already
        the per-layer node and the current kernel has a leading axis of size 1.
    """

    node: Any
    path: str
    strategy: Callable
    permutation: tuple[int, ...]
    dtype: Any
    memo: dict = dataclasses.field(default_factory=dict)
    strategy_name: str = "?"
    context: CallContext = dataclasses.field(default_factory=CallContext)
    pending_layer: bool = False

    def view(self, **changes) -> KernelProxy:
        return dataclasses.replace(self, **changes)

    def fresh(self, node=None) -> KernelProxy:
        """This proxy for a new trace scope (a body of control flow): a new memo, and
        optionally the node as that scope sees it (e.g. a function argument)."""
        return dataclasses.replace(self, node=self.node if node is None else node, memo={})

    @property
    def shape(self) -> tuple[int, ...]:
        """The current kernel's shape (after the recorded transposes)."""
        original = self.node.meta.layout.shape
        return (1,) * self.pending_layer + tuple(original[a] for a in self.permutation)

    def materialize(self, kernel):
        """The original-layout `kernel` seen through this proxy's transposes and cast."""
        if self.permutation != tuple(range(len(self.permutation))):
            kernel = jnp.transpose(kernel, self.permutation)
        kernel = kernel.astype(self.dtype)
        return kernel[None] if self.pending_layer else kernel

    def merged(self):
        """The dense adapted kernel (current view), merged once per scope."""
        if "merged" not in self.memo:
            self.context.record(self.path, "rebuild")
            self.memo["merged"] = self.node.materialize()
        return self.materialize(self.memo["merged"])

    def densify(self, primitive: str, why: str):
        """The merged kernel for a use the interpreter cannot follow, reported as a fallback."""
        self.context.fallback(self.path, self.strategy_name, primitive, why)
        return self.merged()


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
        return self.not_factorable_because is None

    @property
    def not_factorable_because(self) -> str | None:
        """Why this dot cannot run a factored product (None when it can)."""
        x_c, k_c, x_b, k_b = self._dims
        if self.layout.stack_ndim:
            return (f"the kernel is a stack of {self.layout.stack_shape} matrices used in one "
                    f"dot_general (not sliced per layer by a scan)")
        if x_b or k_b:
            return "the dot_general has batch dimensions"
        original = tuple(self.proxy.permutation[i] for i in k_c)
        if sorted(original) != sorted(self.layout.in_axes):
            return (f"it contracts kernel axes {sorted(original)}, not W's input axes "
                    f"{sorted(self.layout.in_axes)}")
        return None

    @property
    def fallback_reason(self) -> str | None:
        """Why a non-dense strategy would merge this kernel here (None: it need not)."""
        name = self.proxy.strategy_name
        if name in _DENSE_STRATEGIES:
            return None
        applies_to = getattr(self.proxy.strategy, "applies_to", None)
        if applies_to is not None and not applies_to(self.proxy.node):
            return f"{name!r} is not defined for {type(self.proxy.node).__name__} nodes"
        return self.not_factorable_because

    def dense(self, kernel):
        """The original dot_general with `kernel` (original layout) in place of the proxy."""
        return self.dense_kernel_view(self.proxy.materialize(kernel))

    def dense_merged(self):
        """The original dot with the merged kernel (merged once per scope, see KernelProxy).

        Reported as a fallback when the strategy is not a dense one and the dot could not
        run its factored product (see `fallback_reason`).
        """
        reason = self.fallback_reason
        if reason is not None:
            self.proxy.context.fallback(self.proxy.path, self.proxy.strategy_name, "dot_general", reason)
        return self.dense_kernel_view(self.proxy.merged())

    def dense_kernel_view(self, operand):
        operands = (operand, self.x) if self.kernel_is_lhs else (self.x, operand)
        return jax.lax.dot_general_p.bind(*operands, **self.params)

    def record(self, name: str) -> None:
        """Note which strategy actually ran this dot (read back by `wrap(...).plan`)."""
        self.proxy.context.record(self.proxy.path, name)

    def with_x(self, x) -> KernelUse:
        return dataclasses.replace(self, x=x)

    def input_matrix(self):
        """x with its contracted axes moved last in W's input order: (*free, d2)."""
        x_c, k_c, _, _ = self._dims
        by_original_axis = {self.proxy.permutation[k]: xc for xc, k in zip(x_c, k_c, strict=True)}
        ordered = [by_original_axis[axis] for axis in self.layout.in_axes]
        free = self.x_free_dims
        order = (*free, *ordered)
        x = jnp.transpose(self.x, order) if order != tuple(range(self.x.ndim)) else self.x
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


# --------------------------------------------------------------------------- layer slicing
def register_layer_slicer(node_type: type, slicer: Callable) -> None:
    """Removed in issue 19: a node type slices itself through the protocol hooks
    `AdapterNode.layer_slicer` / `take_layer` (override them in the node class)."""
    raise TypeError(f"register_layer_slicer({node_type.__name__}, ...) is gone: define `layer_slicer(self)` (and, "
                    "if a static index needs another answer, `take_layer(self, index)`) on the node class instead.")


def layer_slicer(node):
    """(stacked, rebuild) for a node stacked on its leading axis, or None (the node's
    `layer_slicer` hook)."""
    return node.layer_slicer()


def slice_layer(node, index):
    """Layer `index` (an int or a traced integer) of a node stacked on its leading axis.

    Returns the per-layer node (its layout without the stack axis), or None when the node
    cannot be sliced (the node's `take_layer` hook).
    """
    return node.take_layer(index)


# --------------------------------------------------------------------------- the interpreter
def _is_proxy(value) -> bool:
    return isinstance(value, KernelProxy)


_bind = _jaxpr.bind


def _dense_outputs(values, primitive: str, why: str) -> list:
    return [v.densify(primitive, why) if _is_proxy(v) else v for v in values]


class _Split:
    """The values entering a body, split into proxies (their nodes travel as a pytree
    argument or closure) and ordinary values."""

    def __init__(self, values):
        self.values = list(values)
        self.proxy_slots = [i for i, v in enumerate(self.values) if _is_proxy(v)]
        self.array_slots = [i for i, v in enumerate(self.values) if not _is_proxy(v)]

    @property
    def nodes(self) -> list:
        return [self.values[i].node for i in self.proxy_slots]

    @property
    def arrays(self) -> list:
        return [self.values[i] for i in self.array_slots]

    def fill(self, nodes, arrays) -> list:
        """The values as a body sees them: fresh proxies over `nodes`, then `arrays`."""
        out = list(self.values)
        for slot, node in zip(self.proxy_slots, nodes, strict=True):
            out[slot] = self.values[slot].fresh(node)
        for slot, value in zip(self.array_slots, arrays, strict=True):
            out[slot] = value
        return out

    def fill_dense(self, nodes, arrays) -> list:
        """The values with each proxy replaced by its merged kernel (built from `nodes`)."""
        out = list(self.values)
        for slot, node in zip(self.proxy_slots, nodes, strict=True):
            out[slot] = self.values[slot].materialize(node.materialize())
        for slot, value in zip(self.array_slots, arrays, strict=True):
            out[slot] = value
        return out


def _passes_through(jaxpr, in_index: int, out_index: int) -> bool:
    """Whether the body returns input `in_index` unchanged as output `out_index`."""
    return jaxpr.outvars[out_index] is jaxpr.invars[in_index]


def _eval_scan(eqn, invals):
    params = _jaxpr.scan_params(eqn)
    n_consts, n_carry, body = params.num_consts, params.num_carry, params.body
    consts = list(invals[:n_consts])
    carry = list(invals[n_consts:n_consts + n_carry])
    xs = list(invals[n_consts + n_carry:])

    # A kernel carried unchanged is a loop constant; one the loop changes is not a kernel.
    fixed = {}
    for i, value in enumerate(carry):
        if _is_proxy(value):
            if _passes_through(body.jaxpr, n_consts + i, i):
                fixed[i] = value
            else:
                carry[i] = value.densify("scan", "the kernel is changed in the loop carry")
    # Kernels scanned over their leading stack axis become per-layer nodes.
    sliced = {}
    for j, value in enumerate(xs):
        if not _is_proxy(value):
            continue
        layout = value.node.meta.layout
        if value.strategy_name == "rebuild":
            # The chosen strategy is the dense kernel: merge the whole stack once, outside the
            # loop (one batched merge), and scan over it as the model would.
            xs[j] = value.merged()
            continue
        if value.permutation[0] != 0 or layout.stack_ndim < 1:
            xs[j] = value.densify("scan", "the scan slices a kernel axis that is not a stacked-layer axis")
            continue
        found = layer_slicer(value.node)
        if found is None:
            xs[j] = value.densify("scan", f"{type(value.node).__name__} cannot be sliced per layer "
                                          f"(its layer_slicer hook returns None)")
            continue
        sliced[j] = found
    dynamic_carry = [c for i, c in enumerate(carry) if i not in fixed]
    scanned = [sliced[j][0] if j in sliced else x for j, x in enumerate(xs)]

    def step(carry_values, x_values):
        full_carry, it = [], iter(carry_values)
        for i in range(n_carry):
            full_carry.append(fixed[i].fresh() if i in fixed else next(it))
        body_xs = []
        for j, x in enumerate(x_values):
            if j in sliced:
                proxy = xs[j]
                permutation = tuple(a - 1 for a in proxy.permutation[1:])
                body_xs.append(proxy.view(node=sliced[j][1](x), permutation=permutation, memo={}))
            else:
                body_xs.append(x)
        body_consts = [c.fresh() if _is_proxy(c) else c for c in consts]
        outs = interpret(body.jaxpr, body.consts, [*body_consts, *full_carry, *body_xs])
        carry_out = [o for i, o in enumerate(outs[:n_carry]) if i not in fixed]
        carry_out = _dense_outputs(carry_out, "scan", "the loop carries a kernel")
        ys = _dense_outputs(outs[n_carry:], "scan", "the scan stacks a kernel as an output")
        return carry_out, ys

    carry_out, ys = jax.lax.scan(step, dynamic_carry, scanned, length=params.length,
                                 reverse=params.reverse, unroll=params.unroll)
    it = iter(carry_out)
    full = [fixed[i] if i in fixed else next(it) for i in range(n_carry)]
    return [*full, *ys]


def _eval_while(eqn, invals):
    params = _jaxpr.while_params(eqn)
    cond_jaxpr, body_jaxpr = params.cond, params.body
    n_cond, n_body = params.cond_nconsts, params.body_nconsts
    cond_consts = list(invals[:n_cond])
    body_consts = list(invals[n_cond:n_cond + n_body])
    carry = list(invals[n_cond + n_body:])
    fixed = {}
    for i, value in enumerate(carry):
        if _is_proxy(value):
            if _passes_through(body_jaxpr.jaxpr, n_body + i, i):
                fixed[i] = value
            else:
                carry[i] = value.densify("while", "the kernel is changed in the loop carry")
    dynamic = [c for i, c in enumerate(carry) if i not in fixed]

    def full(values):
        it = iter(values)
        return [fixed[i].fresh() if i in fixed else next(it) for i in range(len(carry))]

    def fresh(values):
        return [v.fresh() if _is_proxy(v) else v for v in values]

    def cond_fn(values):
        (out,) = interpret(cond_jaxpr.jaxpr, cond_jaxpr.consts, [*fresh(cond_consts), *full(values)])
        return out

    def body_fn(values):
        outs = interpret(body_jaxpr.jaxpr, body_jaxpr.consts, [*fresh(body_consts), *full(values)])
        outs = [o for i, o in enumerate(outs) if i not in fixed]
        return _dense_outputs(outs, "while", "the loop carries a kernel")

    out = jax.lax.while_loop(cond_fn, body_fn, dynamic)
    it = iter(out)
    return [fixed[i] if i in fixed else next(it) for i in range(len(carry))]


def _eval_cond(eqn, invals):
    index, operands = invals[0], _Split(invals[1:])
    nodes = operands.nodes

    def branch_fn(branch):
        def run(arrays):
            outs = interpret(branch.jaxpr, branch.consts, operands.fill(nodes, arrays))
            return _dense_outputs(outs, "cond", "a branch returns a kernel")
        return run

    return list(jax.lax.switch(index, [branch_fn(b) for b in _jaxpr.cond_branches(eqn)], operands.arrays))


def _eval_remat(eqn, invals):
    body, prevent_cse, policy = _jaxpr.remat_params(eqn)  # body: an open Jaxpr without constants
    operands = _Split(invals)

    def run(nodes, arrays):
        outs = interpret(body, (), operands.fill(nodes, arrays))
        return _dense_outputs(outs, "checkpoint", "the remat body returns a kernel")

    remat = jax.checkpoint(run, prevent_cse=prevent_cse, policy=policy)
    return list(remat(operands.nodes, operands.arrays))


def _eval_custom_vjp(eqn, invals):
    """Primal: the interpreted body. Backward: the user's rule on the merged kernel (its
    forward recomputed there, as remat would), the kernel's cotangent pulled back to the node."""
    body = _jaxpr.custom_call_body(eqn)
    operands = _Split(invals)

    def primal(nodes, arrays):
        outs = interpret(body.jaxpr, body.consts, operands.fill(nodes, arrays))
        return _dense_outputs(outs, "custom_vjp_call", "the function returns a kernel")

    def dense(nodes, arrays):
        return list(_bind(eqn, operands.fill_dense(nodes, arrays)))

    function = jax.custom_vjp(primal)

    def forward(nodes, arrays):
        return primal(nodes, arrays), (nodes, arrays)

    def backward(residuals, cotangents):
        _, pullback = jax.vjp(dense, *residuals)
        return pullback(cotangents)

    function.defvjp(forward, backward)
    return list(function(operands.nodes, operands.arrays))


def _eval_custom_jvp(eqn, invals):
    """Primal: the interpreted body. Tangents: the user's rule on the merged kernel, with the
    kernel's tangent the merged kernel's JVP in the node."""
    body = _jaxpr.custom_call_body(eqn)
    operands = _Split(invals)

    def primal(nodes, arrays):
        outs = interpret(body.jaxpr, body.consts, operands.fill(nodes, arrays))
        return _dense_outputs(outs, "custom_jvp_call", "the function returns a kernel")

    def dense(nodes, arrays):
        return list(_bind(eqn, operands.fill_dense(nodes, arrays)))

    function = jax.custom_jvp(primal)

    def jvp(primals, tangents):
        return jax.jvp(dense, primals, tangents)

    function.defjvp(jvp)
    return list(function(operands.nodes, operands.arrays))


_HIGHER_ORDER = {
    "scan": _eval_scan,
    "while": _eval_while,
    "cond": _eval_cond,
    **dict.fromkeys(_jaxpr.REMATS, _eval_remat),
    **dict.fromkeys(_jaxpr.CUSTOM_VJP, _eval_custom_vjp),
    **dict.fromkeys(_jaxpr.CUSTOM_JVP, _eval_custom_jvp),
}


def _layer_index(eqn, invals):
    """For `slice`/`dynamic_slice` of a stacked kernel that takes one whole layer (size 1 on
    the leading stack axis, everything else in full): the layer index; else None."""
    proxy = invals[0]
    layout = proxy.node.meta.layout
    if proxy.pending_layer or layout.stack_ndim < 1 or proxy.permutation[0] != 0:
        return None
    shape = proxy.shape
    if eqn.primitive.name == "slice":
        start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
        strides = eqn.params.get("strides") or (1,) * len(shape)
        full = all(start[a] == 0 and limit[a] == shape[a] for a in range(1, len(shape)))
        if limit[0] - start[0] == 1 and full and all(s == 1 for s in strides):
            return int(start[0])
        return None
    sizes = eqn.params["slice_sizes"]
    # Full-size slices on the other axes force their starts to 0 (dynamic_slice clamps).
    if sizes[0] == 1 and tuple(sizes[1:]) == tuple(shape[1:]) and all(_is_proxy(v) is False for v in invals[1:]):
        return jnp.clip(invals[1], 0, shape[0] - 1)
    return None


def _eval_layer_slice(eqn, invals):
    """One layer of a stacked kernel (an unrolled loop over stacked weights): the per-layer
    node, pending the `squeeze` of its size-1 axis. None when it is not such a slice."""
    index = _layer_index(eqn, invals)
    if index is None:
        return None
    proxy = invals[0]
    layer = slice_layer(proxy.node, index)
    if layer is None:
        return None
    permutation = tuple(a - 1 for a in proxy.permutation[1:])
    return [proxy.view(node=layer, permutation=permutation, pending_layer=True)]


def _eval_layer_batched_dot(eqn, proxy, x, kernel_is_lhs: bool):
    """A dot_general batched over the stack axis of a stacked kernel (`nn.vmap` layers,
    `einsum('lbi,lio->lbo')`, experts): `jax.vmap` of the strategy over per-layer nodes.
    None when the dot is not of that form (or the node cannot be sliced)."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    k_c, x_c = (lhs_c, rhs_c) if kernel_is_lhs else (rhs_c, lhs_c)
    k_b, x_b = (lhs_b, rhs_b) if kernel_is_lhs else (rhs_b, lhs_b)
    if (len(k_b) != 1 or proxy.pending_layer or proxy.node.meta.layout.stack_ndim < 1
            or proxy.permutation[k_b[0]] != 0):
        return None
    found = layer_slicer(proxy.node)
    if found is None:
        return None
    stacked, rebuild = found
    kb, xb = k_b[0], x_b[0]
    k_c = tuple(a - (a > kb) for a in k_c)
    x_c = tuple(a - (a > xb) for a in x_c)
    dims = ((k_c, x_c) if kernel_is_lhs else (x_c, k_c), ((), ()))
    params = {**eqn.params, "dimension_numbers": dims}
    permutation = tuple(a - 1 for i, a in enumerate(proxy.permutation) if i != kb)
    out_dtype = eqn.outvars[0].aval.dtype

    def one_layer(layer_arrays, x_layer):
        layer = proxy.view(node=rebuild(layer_arrays), permutation=permutation, memo={})
        use = KernelUse(layer, x_layer, kernel_is_lhs=kernel_is_lhs, params=params, out_dtype=out_dtype)
        return layer.strategy(layer.node, use)

    # dot_general puts batch dimensions first in its output, as vmap's out_axes=0 does.
    return jax.vmap(one_layer, in_axes=(0, xb))(stacked, x)


def _eval_eqn(eqn, invals):
    """Evaluate one equation where some inputs may be proxies. Returns a list of outputs."""
    name = eqn.primitive.name
    proxies = [i for i, v in enumerate(invals) if _is_proxy(v)]
    if proxies and any(invals[i].pending_layer for i in proxies):
        if name == "squeeze" and tuple(eqn.params["dimensions"]) == (0,):
            return [invals[0].view(pending_layer=False)]
        proxies = []  # a layer slice used otherwise: the dense layer (reported below)
        invals = [v.densify(name, "one layer of a stacked kernel is used without squeezing its "
                                  "layer axis") if _is_proxy(v) else v for v in invals]
    if proxies:
        if name in ("slice", "dynamic_slice") and proxies == [0]:
            out = _eval_layer_slice(eqn, invals)
            if out is not None:
                return out
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
            batched = _eval_layer_batched_dot(eqn, proxy, x, index == 0)
            if batched is not None:
                return [batched]
            use = KernelUse(proxy, x, kernel_is_lhs=index == 0, params=dict(eqn.params),
                            out_dtype=eqn.outvars[0].aval.dtype)
            return [proxy.strategy(proxy.node, use)]
        inner = _jaxpr.call_body(eqn)
        if inner is not None:
            return interpret(inner.jaxpr, inner.consts, invals)
        if name in _HIGHER_ORDER:
            return _HIGHER_ORDER[name](eqn, invals)
        why = ("two adapted kernels meet in one dot_general" if name == "dot_general"
               else "the interpreter does not follow this primitive with an adapter node")
        invals = [v.densify(name, why) if _is_proxy(v) else v for v in invals]
    out = _bind(eqn, invals)
    return list(out) if eqn.primitive.multiple_results else [out]


def interpret(jaxpr, consts, args) -> list:
    """Evaluate `jaxpr` on `args`, some of which may be `KernelProxy`s.

    Returns the outputs; an output may itself be a proxy (a kernel passed through a jit
    boundary), which the caller densifies (reporting it) or keeps.
    """
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
    return [read(v) for v in jaxpr.outvars]


def interpret_top(jaxpr, consts, args) -> list:
    """`interpret`, with any kernel returned by the function densified (and reported)."""
    return _dense_outputs(interpret(jaxpr, consts, args), "return", "the function returns the kernel")


def is_array(x) -> bool:
    """Leaves traced as inputs (arrays and tracers); everything else is static."""
    return isinstance(x, jax.Array | np.ndarray | np.generic)
