"""The jaxpr reader (`svft_jax.strategies._jaxpr`) on the installed JAX.

CI runs this file on the oldest (jax 0.10.2, `make test`) and the newest (jax 0.12.x,
`make test-latest`) supported JAX. Truth: the operand and output counts that the traced
functions were built with, and each body re-evaluated on the equation's own operands giving
the primitive's own outputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svft_jax.strategies import _jaxpr


def _eqn(fn, *args, name):
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == name]
    assert len(found) == 1, [e.primitive.name for e in jaxpr.jaxpr.eqns]
    return found[0]


def _operands(fn, eqn, *args):
    """The values of `eqn`'s operands when `fn(*args)` runs."""
    closed = jax.make_jaxpr(fn)(*args)
    env = dict(zip(closed.jaxpr.invars, args, strict=True))
    env.update(zip(closed.jaxpr.constvars, closed.consts, strict=True))
    return [v.val if isinstance(v, _jaxpr.Literal) else env[v] for v in eqn.invars]


def _w(n=4):
    return jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)


def test_scan_counts_match_the_operands_and_the_body():
    """Two carried values (one unchanged, which jax 0.12 forwards into the constants), one xs,
    two closed-over arrays, one ys: the counts add up to the operands, and the body's outputs are
    the carry then the ys."""
    w = _w()

    def fn(x, y, xs):
        def body(carry, xi):
            a, b = carry
            return (jnp.tanh(a @ w + xi * y.sum()), b), a.sum()
        return jax.lax.scan(body, (x, x + 1), xs)

    eqn = _eqn(fn, jnp.ones(4), jnp.ones(2), jnp.ones((3, 4)), name="scan")
    read = _jaxpr.scan_params(eqn)
    num_xs = len(eqn.invars) - read.num_consts - read.num_carry
    assert num_xs == 1
    assert read.num_carry in (1, 2)  # 2 on jax ≤ 0.11; 1 where the unchanged carry became a constant
    assert len(read.body.jaxpr.invars) == len(eqn.invars)
    assert len(read.body.jaxpr.outvars) == read.num_carry + 1  # carry, then one ys
    assert (read.length, read.reverse) == (3, False)


def test_scan_body_reproduces_the_scan():
    """Running lax.scan over the read body with the read counts equals the equation's own result."""
    w = _w()

    def fn(x, xs):
        return jax.lax.scan(lambda c, xi: (jnp.sin(c @ w) + xi, c.sum()), x, xs, reverse=True)

    x, xs = jnp.ones(4), jnp.arange(12.0).reshape(3, 4)
    eqn = _eqn(fn, x, xs, name="scan")
    read = _jaxpr.scan_params(eqn)
    operands = _operands(fn, eqn, x, xs)
    consts = operands[:read.num_consts]
    carry = operands[read.num_consts:read.num_consts + read.num_carry]
    scanned = operands[read.num_consts + read.num_carry:]

    def step(c, x_slices):
        outs = jax.core.eval_jaxpr(read.body.jaxpr, read.body.consts, *consts, *c, *x_slices)
        return outs[:read.num_carry], outs[read.num_carry:]

    carry_out, ys = jax.lax.scan(step, carry, scanned, length=read.length, reverse=read.reverse)
    want = fn(x, xs)
    np.testing.assert_allclose(np.asarray(carry_out[0]), np.asarray(want[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ys[0]), np.asarray(want[1]), rtol=1e-6)


def test_while_and_fori_counts():
    w = _w()

    def fn(x, limit):
        return jax.lax.while_loop(lambda c: c[1] < limit, lambda c: (c[0] @ w, c[1] + 1), (x, 0))

    eqn = _eqn(fn, jnp.ones(4), 3, name="while")
    read = _jaxpr.while_params(eqn)
    assert len(eqn.invars) - read.cond_nconsts - read.body_nconsts == 2  # the two carried values
    assert len(read.body.jaxpr.outvars) == 2
    assert len(read.cond.jaxpr.outvars) == 1


def test_cond_branches_remat_calls_and_custom_rules():
    w = _w()

    @jax.custom_vjp
    def vjp_fn(c):
        return c @ w

    vjp_fn.defvjp(lambda c: (c @ w, None), lambda _, t: (t @ w.T,))

    @jax.custom_jvp
    def jvp_fn(c):
        return jnp.sin(c)

    jvp_fn.defjvp(lambda p, t: (jnp.sin(p[0]), jnp.cos(p[0]) * t[0]))

    x = jnp.ones(4)
    branches = _jaxpr.cond_branches(_eqn(lambda c: jax.lax.cond(c.sum() > 0, lambda c: c @ w, jnp.sin, c), x,
                                         name="cond"))
    assert len(branches) == 2
    remat = [e for e in jax.make_jaxpr(jax.checkpoint(lambda c: c @ w))(x).jaxpr.eqns
             if e.primitive.name in _jaxpr.REMATS]
    body, prevent_cse, _ = _jaxpr.remat_params(remat[0])
    assert len(body.invars) == len(remat[0].invars) and prevent_cse is True
    calls = [e for e in jax.make_jaxpr(lambda c: jax.jit(jnp.sin)(c))(x).jaxpr.eqns
             if _jaxpr.call_body(e) is not None]
    assert len(calls) == 1 and len(_jaxpr.call_body(calls[0]).jaxpr.invars) == 1
    for fn, names in ((vjp_fn, _jaxpr.CUSTOM_VJP), (jvp_fn, _jaxpr.CUSTOM_JVP)):
        (eqn,) = [e for e in jax.make_jaxpr(fn)(x).jaxpr.eqns if e.primitive.name in names]
        body = _jaxpr.custom_call_body(eqn)
        got = jax.core.eval_jaxpr(body.jaxpr, body.consts, *_operands(fn, eqn, x))
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(fn(x)), rtol=1e-6)


def test_an_unknown_spelling_is_refused_naming_the_file():
    eqn = _eqn(lambda xs: jax.lax.scan(lambda c, x: (c + x, c), 0.0, xs), jnp.ones(3), name="scan")
    broken = eqn.replace(params={k: v for k, v in eqn.params.items() if k not in ("num_consts", "ft_in")})
    with pytest.raises(_jaxpr.UnsupportedJaxprError, match="_jaxpr.py"):
        _jaxpr.scan_params(broken)
