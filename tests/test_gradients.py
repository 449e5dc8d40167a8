"""Gradients with respect to m (and the reference init's gate).

Two independent truths: central finite differences (`jax.test_util.check_grads`, forward and
reverse mode) and the closed form ∂⟨G, W⟩/∂M_ij = (Uᵀ G V)_ij evaluated in numpy.
merge computes in float32 whatever the x64 flag, so the checks run in float32 with a step
and tolerances sized for it (eps = 1e-2 on a smooth loss of O(1) curvature).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import svft_jax
from tests import reference

PATTERNS = [
    pytest.param("plain", {}, id="plain"),
    pytest.param("banded", {"d": 2}, id="banded-d2"),
    pytest.param("random", {"k": 7}, id="random-k7"),
    pytest.param("topk", {"k": 7}, id="topk-k7"),
    pytest.param("banded", {"d": 1, "rank": 3}, id="banded-d1-rank3"),
]
# A Dense kernel (in=6, out=5) and a stacked one (3 layers of in=4, out=5): W is out × in.
SHAPES = {"dense": (6, 5), "stacked": (3, 4, 5)}
FD = dict(eps=1e-2, atol=2e-2, rtol=2e-2)


def _adapted(pattern, options, shape_name="dense", **kwargs):
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=SHAPES[shape_name]), jnp.float32)
    layout = {"layer/kernel": {"layout": "stacked_in_out"}} if shape_name == "stacked" else None  # never inferred
    adapted = svft_jax.apply({"layer": {"kernel": kernel}}, pattern, svd_backend="numpy", overrides=layout, **options, **kwargs)
    node = adapted["layer"]["kernel"]
    m = jnp.asarray(rng.normal(size=node.m.shape) * 0.5, jnp.float32)
    return dataclasses.replace(node, m=m)


def _smooth_loss(node):
    """A non-quadratic scalar of the merged kernel, so finite differences test curvature too."""
    kernel = svft_jax.merge({"k": node})["k"]
    target = jnp.cos(jnp.arange(kernel.size, dtype=jnp.float32)).reshape(kernel.shape)
    return jnp.sum(jnp.tanh(kernel) * target) + 0.1 * jnp.sum(kernel**2)


# check_grads compiles several programs per case, so finite differences cover one case per
# code path of the left product (diagonal, band slices, gather/segment-sum per layer, rank < r);
# the closed-form test below covers every pattern × shape.
FD_CASES = [
    pytest.param("plain", {}, "dense", id="dense-plain"),
    pytest.param("banded", {"d": 2}, "dense", id="dense-banded-d2"),
    pytest.param("topk", {"k": 7}, "dense", id="dense-topk-k7"),
    pytest.param("random", {"k": 7}, "stacked", id="stacked-random-k7"),
    pytest.param("banded", {"d": 1, "rank": 3}, "stacked", id="stacked-banded-d1-rank3"),
]


@pytest.mark.parametrize(("pattern", "options", "shape_name"), FD_CASES)
def test_grad_wrt_m_matches_finite_differences(pattern, options, shape_name):
    node = _adapted(pattern, options, shape_name)
    loss_of_m = jax.jit(lambda m: _smooth_loss(dataclasses.replace(node, m=m)))
    check_grads(loss_of_m, (node.m,), order=1, modes=("rev", "fwd"), **FD)


def test_grad_wrt_gate_matches_finite_differences():
    node = _adapted("banded", {"d": 1}, "stacked", init="reference")
    gate = jnp.asarray([-0.5, 0.3, 1.2], jnp.float32)
    loss_of_gate = jax.jit(lambda g: _smooth_loss(dataclasses.replace(node, gate=g)))
    check_grads(loss_of_gate, (gate,), order=1, modes=("rev", "fwd"), **FD)


@pytest.mark.parametrize(("pattern", "options"), PATTERNS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_grad_of_linear_loss_is_ut_g_v_on_omega(pattern, options, shape_name):
    node = _adapted(pattern, options, shape_name)
    g_kernel = np.random.default_rng(5).normal(size=SHAPES[shape_name]).astype(np.float32)
    linear = jax.jit(jax.grad(lambda m: jnp.sum(svft_jax.merge({"k": dataclasses.replace(node, m=m)})["k"] * g_kernel)))
    expected = reference.omega_gradient(node, g_kernel)
    np.testing.assert_allclose(np.asarray(linear(node.m)), expected, rtol=1e-4, atol=1e-4)


def test_grad_wrt_gate_is_sigmoid_derivative_times_m_dot_ut_g_v():
    node = _adapted("random", {"k": 6}, "stacked", init="reference")
    gate = np.array([-0.5, 0.3, 1.2], np.float32)
    g_kernel = np.random.default_rng(5).normal(size=SHAPES["stacked"]).astype(np.float32)
    grad_gate = jax.jit(jax.grad(lambda g: jnp.sum(svft_jax.merge({"k": dataclasses.replace(node, gate=g)})["k"] * g_kernel)))
    sigma = 1.0 / (1.0 + np.exp(-gate.astype(np.float64)))
    at_omega = reference.omega_gradient(node, g_kernel)  # (3, |Ω|)
    expected = sigma * (1.0 - sigma) * np.sum(np.asarray(node.m, np.float64) * at_omega, axis=-1)
    np.testing.assert_allclose(np.asarray(grad_gate(jnp.asarray(gate))), expected, rtol=1e-4, atol=1e-5)


def test_grad_through_split_and_combine_reaches_only_the_trainable_half():
    node = _adapted("banded", {"d": 1}, "dense")
    adapted = {"layer": {"kernel": node, "bias": jnp.ones(5)}}
    trainable, frozen = svft_jax.split(adapted)
    g_kernel = np.random.default_rng(5).normal(size=SHAPES["dense"]).astype(np.float32)

    def loss(train):
        merged = svft_jax.merge(svft_jax.combine(train, frozen))["layer"]
        return jnp.sum(merged["kernel"] * g_kernel) + jnp.sum(merged["bias"])

    grads = jax.jit(jax.grad(loss))(trainable)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
    grad_node = grads["layer"]["kernel"]
    assert grad_node.u is None and grad_node.base is None and grads["layer"]["bias"] is None
    np.testing.assert_allclose(np.asarray(grad_node.m), reference.omega_gradient(node, g_kernel), rtol=1e-4, atol=1e-4)
