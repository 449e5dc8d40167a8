"""Property-based checks over shapes (d1, d2 in 1..12, optional layer stack), patterns and
d/k/rank: M = 0 gives W0, |Ω| follows the formulas, and merge equals a numpy reference.

Examples are derandomized (the same on every run and machine) and few, so the file is fast.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import svft_jax
from tests import reference

merge = jax.jit(svft_jax.merge)

FAST = settings(
    max_examples=12, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def configurations(draw):
    """(kernel, apply kwargs, r): a Dense kernel (*stack, in=d2, out=d1) and a valid config."""
    d1, d2 = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    stack = draw(st.sampled_from([(), (1,), (2,), (3,)]))
    full = min(d1, d2)
    rank = draw(st.one_of(st.none(), st.integers(1, full)))
    r = full if rank is None else rank
    pattern = draw(st.sampled_from(["plain", "banded", "random", "topk"]))
    kwargs = {"rank": rank, "svd_backend": "numpy", "seed": draw(st.integers(0, 2**31))}
    if pattern == "banded":
        kwargs["d"] = draw(st.integers(0, 4))
    elif pattern in ("random", "topk"):
        if draw(st.booleans()):
            kwargs["k"] = draw(st.integers(1, r * r))
        else:
            kwargs["d"] = draw(st.integers(0, 3))  # the banded budget of d
    if stack:  # a 3-D stack could also read as DenseGeneral; say which it is
        kwargs["overrides"] = {".*": {"layout": "stacked_in_out"}}
    values = np.random.default_rng(draw(st.integers(0, 2**31))).normal(size=(*stack, d2, d1))
    return jnp.asarray(values, jnp.float32), pattern, kwargs, r


def _expected_count(pattern, kwargs, r):
    """|Ω| per layer by enumeration / the formulas, independent of svft_jax.patterns."""
    if pattern == "plain":
        return r
    if pattern == "banded" or kwargs.get("k") is None:
        d = kwargs["d"]
        return sum(1 for i in range(r) for j in range(r) if abs(i - j) <= d)
    return kwargs["k"]


def _reference_kernel(node):
    return reference.kernel(node)


@FAST
@given(configurations())
def test_zero_m_reproduces_w0_for_any_shape_and_pattern(config):
    kernel, pattern, kwargs, _ = config
    adapted = svft_jax.apply({"layer": {"kernel": kernel}}, pattern, **kwargs)
    np.testing.assert_array_equal(np.asarray(merge(adapted)["layer"]["kernel"]), np.asarray(kernel))


@settings(FAST, max_examples=25)
@given(configurations())
def test_trainable_count_matches_the_formula_for_any_shape_and_pattern(config):
    kernel, pattern, kwargs, r = config
    node = svft_jax.apply({"layer": {"kernel": kernel}}, pattern, **kwargs)["layer"]["kernel"]
    layers = int(np.prod(kernel.shape[:-2]))
    per_layer = _expected_count(pattern, kwargs, r)
    assert node.meta.num_entries == per_layer
    assert node.m.shape == (*kernel.shape[:-2], per_layer)
    assert node.num_trainable == layers * per_layer
    positions = node.meta.rows.array * r + node.meta.cols.array
    assert all(len(set(p)) == per_layer for p in positions.reshape(-1, per_layer)), "Ω repeats a position"


@FAST
@given(configurations(), st.integers(0, 2**31))
def test_merge_equals_numpy_reference_for_random_m(config, m_seed):
    kernel, pattern, kwargs, _ = config
    node = svft_jax.apply({"layer": {"kernel": kernel}}, pattern, **kwargs)["layer"]["kernel"]
    m = np.random.default_rng(m_seed).normal(size=node.m.shape)
    node = dataclasses.replace(node, m=jnp.asarray(m, jnp.float32))
    got = np.asarray(merge({"k": node})["k"], np.float64)
    np.testing.assert_allclose(got, _reference_kernel(node), rtol=1e-4, atol=1e-4)
