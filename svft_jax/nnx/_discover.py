"""Where each weight meets a matmul: its (stack, in, out) axes read from the contraction.

The model is traced once (`jax.make_jaxpr`) with every state leaf as an input; this module
walks the jaxpr and follows each candidate weight through what the execution interpreter
(`svft_jax.strategies.interpreter`) also follows — transposes, float casts, copies, calls
(jit), remat, custom_vjp/custom_jvp bodies, cond/while operands, `scan` over its leading axis
and one-layer slices `w[i]` — to the `dot_general`s it takes part in. `jnp.einsum`,
`jnp.dot`, `@`, `jnp.matmul` and `lax.dot_general` all reach a `dot_general`, whose dimension
numbers say which axes of the weight are contracted (in), shared batch axes (stacked layers)
and kept (out). Any other use — a gather (an embedding lookup), a reshape before the matmul,
an elementwise product (a norm scale) — is recorded with the primitive and the source line, so
the caller can say why a weight is not adapted. Nothing is guessed from shapes or names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp

from svft_jax.strategies import _jaxpr
from svft_jax.strategies._jaxpr import Literal

# Single-operand primitives that only relabel the weight (the interpreter's _PASS_THROUGH).
_PASS_THROUGH = ("copy", "copy_p", "optimization_barrier")


@dataclasses.dataclass(frozen=True)
class Use:
    """One use of a weight in the traced call.

    Attributes:
      primitive: "dot_general" for a matmul, else the primitive that used the weight.
      stack, in_axes, out_axes: for a matmul, the weight's stacked-layer, contracted and kept
        axes (sorted; stacked axes are leading); empty otherwise.
      where: the user code that emitted the op ('file.py:12 (fn)'), '' if unknown.
      why: for a use that is not a usable matmul, what it is.
    """

    primitive: str
    stack: tuple[int, ...] = ()
    in_axes: tuple[int, ...] = ()
    out_axes: tuple[int, ...] = ()
    where: str = ""
    why: str = ""

    @property
    def is_matmul(self) -> bool:
        return self.primitive == "dot_general" and not self.why

    @property
    def layout_key(self) -> tuple:
        return (self.stack, self.in_axes, self.out_axes)

    def describe(self) -> str:
        at = f" at {self.where}" if self.where else ""
        if self.is_matmul:
            stack = f"stack {self.stack}, " if self.stack else ""
            return f"a matmul{at} with {stack}in {self.in_axes}, out {self.out_axes}"
        return f"{self.primitive}{at}" + (f" ({self.why})" if self.why else "")


@dataclasses.dataclass(frozen=True)
class _View:
    """A weight seen through relabelling ops.

    perm[i]: the original axis of current axis i; stacked: original axes already sliced away
    (scan over the leading axis, or `w[i]`), in order; pending: a one-layer slice awaiting its
    squeeze.
    """

    path: str
    perm: tuple[int, ...]
    stacked: tuple[int, ...] = ()
    pending: bool = False


class _Walk:
    def __init__(self):
        self.uses: dict[str, list[Use]] = {}

    def record(self, view: _View, use: Use) -> None:
        self.uses.setdefault(view.path, []).append(use)

    def other(self, views, eqn, why: str = "") -> None:
        for view in views:
            if view is not None:
                self.record(view, Use(eqn.primitive.name, where=_jaxpr.source_line(eqn), why=why))

    # ---------------------------------------------------------------- the walk
    def walk(self, jaxpr, in_views) -> list:
        env: dict = {}
        for var, view in zip(jaxpr.invars, in_views, strict=True):
            if view is not None:
                env[var] = view
        for eqn in jaxpr.eqns:
            views = [None if isinstance(v, Literal) else env.get(v) for v in eqn.invars]
            if not any(v is not None for v in views):
                continue
            outs = self.eqn(eqn, views)
            for var, view in zip(eqn.outvars, outs, strict=True):
                if view is not None:
                    env[var] = view
        return [None if isinstance(v, Literal) else env.get(v) for v in jaxpr.outvars]

    def eqn(self, eqn, views) -> list:
        name = eqn.primitive.name
        none = [None] * len(eqn.outvars)
        present = [i for i, v in enumerate(views) if v is not None]
        if any(views[i].pending for i in present):
            if name == "squeeze" and tuple(eqn.params["dimensions"]) == (0,):
                view = views[0]
                return [dataclasses.replace(view, perm=view.perm[1:], stacked=(*view.stacked, view.perm[0]), pending=False)]
            self.other(views, eqn, "one layer of a stacked weight used without squeezing its layer axis")
            return none
        if name == "transpose":
            view = views[0]
            return [dataclasses.replace(view, perm=tuple(view.perm[i] for i in eqn.params["permutation"]))]
        if name == "convert_element_type":
            if jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
                return [views[0]]
            self.other(views, eqn, "cast to a non-float dtype")
            return none
        if name in _PASS_THROUGH and len(views) == 1:
            return [views[0]]
        if name in ("slice", "dynamic_slice") and present == [0]:
            if self.one_layer(eqn, views[0]):
                return [dataclasses.replace(views[0], pending=True)]
            self.other(views, eqn, "the weight is sliced before its matmul")
            return none
        if name == "dot_general":
            if len(present) == 1:
                self.dot(eqn, views[present[0]], present[0] == 0)
            else:
                self.other(views, eqn, "two weights meet in one dot_general")
            return none
        body = _jaxpr.call_body(eqn)
        if body is not None:
            return self.walk(body.jaxpr, views)
        if name == "scan":
            return self.scan(eqn, views)
        if name == "while":
            return self.while_(eqn, views)
        if name == "cond":
            for branch in _jaxpr.cond_branches(eqn):
                self.body_outputs(branch.jaxpr, views[1:], eqn, "a branch returns the weight")
            return none
        if name in _jaxpr.REMATS:
            body_jaxpr, _, _ = _jaxpr.remat_params(eqn)
            self.body_outputs(body_jaxpr, views, eqn, "the remat body returns the weight")
            return none
        if name in _jaxpr.CUSTOM_VJP or name in _jaxpr.CUSTOM_JVP:
            self.body_outputs(_jaxpr.custom_call_body(eqn).jaxpr, views, eqn, "the function returns the weight")
            return none
        self.other(views, eqn)
        return none

    def body_outputs(self, jaxpr, views, eqn, why: str) -> None:
        """Walk a body whose outputs must not be the weight (the interpreter densifies those)."""
        outs = self.walk(jaxpr, views)
        self.other(outs, eqn, why)

    @staticmethod
    def one_layer(eqn, view: _View) -> bool:
        """A slice of size 1 on the leading axis, everything else whole (`w[i]`)."""
        shape = tuple(eqn.invars[0].aval.shape)
        if eqn.primitive.name == "slice":
            start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
            strides = eqn.params.get("strides") or (1,) * len(shape)
            return (limit[0] - start[0] == 1 and all(s == 1 for s in strides)
                    and all(start[a] == 0 and limit[a] == shape[a] for a in range(1, len(shape))))
        sizes = eqn.params["slice_sizes"]
        return sizes[0] == 1 and tuple(sizes[1:]) == shape[1:]

    def dot(self, eqn, view: _View, weight_is_lhs: bool) -> None:
        (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
        k_c, k_b = (lhs_c, lhs_b) if weight_is_lhs else (rhs_c, rhs_b)
        where = _jaxpr.source_line(eqn)
        contracted = tuple(view.perm[i] for i in k_c)
        batch = tuple(view.perm[i] for i in k_b)
        kept = tuple(view.perm[i] for i in range(len(view.perm)) if i not in k_c and i not in k_b)
        stack = (*view.stacked, *batch)
        if stack != tuple(range(len(stack))):
            self.record(view, Use("dot_general", where=where, why=(
                f"its layer axes {stack} (scanned, sliced or dot batch axes) are not the weight's leading axes")))
            return
        if not contracted or not kept:
            self.record(view, Use("dot_general", where=where, why=(
                "the matmul contracts every axis of the weight" if not kept else "the matmul contracts no axis of the weight")))
            return
        self.record(view, Use("dot_general", stack=stack, in_axes=tuple(sorted(contracted)),
                              out_axes=tuple(sorted(kept)), where=where))

    def scan(self, eqn, views) -> list:
        params = _jaxpr.scan_params(eqn)
        n_consts, n_carry = params.num_consts, params.num_carry
        body = params.body.jaxpr
        inner = list(views)
        for i in range(n_consts, n_consts + n_carry):
            view = views[i]
            if view is not None and body.outvars[i - n_consts] is not body.invars[i]:
                self.other([view], eqn, "the weight is changed in the loop carry")
                inner[i] = None
        for i in range(n_consts + n_carry, len(views)):
            view = views[i]
            if view is not None:
                inner[i] = dataclasses.replace(view, perm=view.perm[1:], stacked=(*view.stacked, view.perm[0]))
        outs = self.walk(body, inner)
        self.other(outs[n_carry:], eqn, "the scan stacks the weight as an output")
        return [views[n_consts + i] if i < n_carry and inner[n_consts + i] is not None else None for i in range(len(eqn.outvars))]

    def while_(self, eqn, views) -> list:
        params = _jaxpr.while_params(eqn)
        n_cond, n_body = params.cond_nconsts, params.body_nconsts
        carry = list(views[n_cond + n_body:])
        for i, view in enumerate(carry):
            if view is not None and params.body.jaxpr.outvars[i] is not params.body.jaxpr.invars[n_body + i]:
                self.other([view], eqn, "the weight is changed in the loop carry")
                carry[i] = None
        self.walk(params.cond.jaxpr, [*views[:n_cond], *carry])
        self.body_outputs_kept(params.body.jaxpr, [*views[n_cond:n_cond + n_body], *carry], carry, eqn)
        return carry

    def body_outputs_kept(self, jaxpr, views, carry, eqn) -> None:
        outs = self.walk(jaxpr, views)
        self.other([o for o, c in zip(outs, carry, strict=True) if c is None], eqn, "the loop carries the weight")


def find_uses(closed_jaxpr, weights: Mapping[int, str]) -> dict[str, list[Use]]:
    """{path: [Use, ...]} for the jaxpr inputs `weights` ({input index: path}) of `closed_jaxpr`.

    A weight that the traced call never reads has no entry.
    """
    walk = _Walk()
    jaxpr = closed_jaxpr.jaxpr
    views = [None] * len(jaxpr.invars)
    for index, path in weights.items():
        ndim = len(jaxpr.invars[index].aval.shape)
        views[index] = _View(path, tuple(range(ndim)))
    outs = walk.walk(jaxpr, views)
    for view in outs:
        if view is not None:
            walk.record(view, Use("return", why="the call returns the weight itself"))
    return walk.uses
