"""Reading jaxpr equations: the one place that knows each supported JAX's parameter names.

The interpreter (`interpreter.py`) follows control flow by reading the parameters of `scan`,
`while`, `cond`, `jit`, `remat` and `custom_jvp`/`custom_vjp` equations. Those parameters
are JAX internals and change between releases (jax 0.12 replaced scan's `num_consts` /
`num_carry` with the flat trees `ft_in` / `ft_out`), so every read goes through a function
here, and a new JAX release is a change to this file alone. Supported: jax 0.10.2 – 0.12.x
(`tests/test_jaxpr_compat.py` runs on both ends in CI: `make test`, `make test-latest`).

Only public imports (`jax.extend.core`); the flat trees of jax ≥ 0.12 are read through the
methods of the object the equation holds (`unpack`), never by importing `jax._src`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Literal

from svft_jax.errors import UnsupportedJaxprError

__all__ = ["ClosedJaxpr", "Jaxpr", "JaxprEqn", "Literal", "ScanParams", "UnsupportedJaxprError", "bind",
           "call_body", "cond_branches", "custom_call_body", "remat_params", "scan_params", "while_params",
           "CALLS", "REMATS", "CUSTOM_VJP", "CUSTOM_JVP"]

# Primitive names (each supported release's spelling).
CALLS = ("pjit", "jit", "closed_call", "core_call")  # bodies interpreted inline
REMATS = ("remat2", "checkpoint")
CUSTOM_VJP = ("custom_vjp_call", "custom_vjp_call_jaxpr")
CUSTOM_JVP = ("custom_jvp_call",)


def _missing(eqn: JaxprEqn, wanted: str) -> UnsupportedJaxprError:
    return UnsupportedJaxprError(
        f"svft_jax cannot read the `{eqn.primitive.name}` equation's {wanted} on jax {jax.__version__} "
        f"(its parameters: {sorted(eqn.params)}). Supported: jax 0.10.2–0.12.x; teach "
        "svft_jax/strategies/_jaxpr.py the new names, or use a supported jax.")


@dataclasses.dataclass(frozen=True)
class ScanParams:
    """A `scan` equation read: its operands are `[*consts, *carry, *xs]` (counts below), its body
    takes them in that order and returns `[*carry, *ys]`."""

    num_consts: int
    num_carry: int
    body: ClosedJaxpr
    length: int
    reverse: bool
    unroll: Any


def scan_params(eqn: JaxprEqn) -> ScanParams:
    params = eqn.params
    if "num_consts" in params:  # jax ≤ 0.11
        num_consts, num_carry = params["num_consts"], params["num_carry"]
    elif "ft_in" in params:  # jax 0.12: a flat tree of (consts, carry, xs)
        try:
            consts, carry, _ = params["ft_in"].unpack()
        except (AttributeError, TypeError, ValueError) as error:
            raise _missing(eqn, "operand groups (ft_in)") from error
        num_consts, num_carry = len(list(consts)), len(list(carry))
    else:
        raise _missing(eqn, "constant and carry counts")
    return ScanParams(num_consts=num_consts, num_carry=num_carry, body=params["jaxpr"], length=params["length"],
                      reverse=params["reverse"], unroll=params.get("unroll", 1))


@dataclasses.dataclass(frozen=True)
class WhileParams:
    """A `while` equation read: operands `[*cond_consts, *body_consts, *carry]`."""

    cond: ClosedJaxpr
    body: ClosedJaxpr
    cond_nconsts: int
    body_nconsts: int


def while_params(eqn: JaxprEqn) -> WhileParams:
    params = eqn.params
    try:
        return WhileParams(cond=params["cond_jaxpr"], body=params["body_jaxpr"],
                           cond_nconsts=params["cond_nconsts"], body_nconsts=params["body_nconsts"])
    except KeyError as error:
        raise _missing(eqn, "bodies and constant counts") from error


def cond_branches(eqn: JaxprEqn) -> tuple[ClosedJaxpr, ...]:
    """A `cond` equation's branches; its operands are `[index, *operands]`."""
    if "branches" not in eqn.params:
        raise _missing(eqn, "branches")
    return tuple(eqn.params["branches"])


def remat_params(eqn: JaxprEqn) -> tuple[Jaxpr, bool, Any]:
    """(open body without constants, prevent_cse, policy) of a remat/checkpoint equation."""
    if "jaxpr" not in eqn.params:
        raise _missing(eqn, "body")
    return eqn.params["jaxpr"], eqn.params.get("prevent_cse", True), eqn.params.get("policy")


def custom_call_body(eqn: JaxprEqn) -> ClosedJaxpr:
    """The primal body of a custom_jvp/custom_vjp call."""
    for key in ("call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    raise _missing(eqn, "primal body")


def call_body(eqn: JaxprEqn) -> ClosedJaxpr | None:
    """The body of a `jit`/`pjit`/`closed_call` equation, or None for other primitives."""
    if eqn.primitive.name not in CALLS:
        return None
    body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return body if isinstance(body, ClosedJaxpr) else None


def bind(eqn: JaxprEqn, invals) -> Any:
    """Re-run one equation on new operands, in its recorded context."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        return eqn.primitive.bind(*invals, **params)


def source_line(eqn: JaxprEqn) -> str:
    """'file.py:123 (function)' of the innermost model code that emitted `eqn` (frames of jax,
    flax and svft_jax skipped), or '' where this JAX does not say. Used only in messages (which
    op a weight meets), never for a decision."""
    import os

    skipped = tuple(os.sep + name + os.sep for name in ("jax", "jaxlib", "flax", "svft_jax"))
    try:
        from jax._src import source_info_util  # private: read in this one module, guarded

        frames = source_info_util.user_frames(eqn.source_info.traceback)
        for frame in frames:
            if not any(part in frame.file_name for part in skipped):
                short = os.sep.join(frame.file_name.split(os.sep)[-2:])  # 'llama3/model.py'
                return f"{short}:{frame.start_line} ({frame.function_name})"
        return source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - any failure only loses the location in a message
        return ""
