"""merge and a loss/grad step under jit, no jit and pmap (chex variants), explicit pmap on the
8 virtual CPU devices, and vmap over a batch of m.

Truths: a numpy float64 reference of W0 + U M Vᵀ and the closed-form gradient (Uᵀ G V)|_Ω;
per-device and per-example results must equal the plain single-device computation.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svft_jax
from tests import reference

N_DEVICES = 8


def _adapted(pattern="random", **options):
    """Two targets: a Dense kernel (in=6, out=5) and a stacked one (2 layers, in=4, out=5)."""
    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), "bias": jnp.ones(5)},
        "stacked": {"kernel": jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32)},
    }
    if not options and pattern in ("random", "topk"):
        options = {"k": 6}
    adapted = svft_jax.apply(params, pattern, svd_backend="numpy", overrides={"stacked/kernel": {"layout": "stacked_in_out"}}, **options)

    def randomize(node):
        if not svft_jax.is_node(node):
            return node
        return dataclasses.replace(node, m=jnp.asarray(rng.normal(size=node.m.shape), jnp.float32))

    return jax.tree_util.tree_map(randomize, adapted, is_leaf=svft_jax.is_node)


def _reference_kernel(node, m=None):
    return reference.kernel(node, m)


def _omega_gradient(node, g_kernel):
    return reference.omega_gradient(node, g_kernel)


def _cotangents():
    rng = np.random.default_rng(7)
    return {"dense": rng.normal(size=(6, 5)).astype(np.float32),
            "stacked": rng.normal(size=(2, 4, 5)).astype(np.float32)}


def _linear_loss(trainable, frozen, cotangents):
    merged = svft_jax.merge(svft_jax.combine(trainable, frozen))
    return sum(jnp.sum(merged[name]["kernel"] * cotangents[name]) for name in cotangents)


class VariantsTest(chex.TestCase):
    """Each variant runs the same function: plain, jitted, and pmapped over 8 devices."""

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @pytest.mark.filterwarnings("ignore::DeprecationWarning")
    def test_merge_equals_numpy_reference(self):
        # random: per-layer Ω on the stacked kernel, i.e. the gather path under vmap
        adapted = _adapted("random", k=6)
        merged = self.variant(svft_jax.merge)(adapted)
        for name in ("dense", "stacked"):
            np.testing.assert_allclose(np.asarray(merged[name]["kernel"], np.float64),
                                       _reference_kernel(adapted[name]["kernel"]),
                                       rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(merged["dense"]["bias"], adapted["dense"]["bias"])

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @pytest.mark.filterwarnings("ignore::DeprecationWarning")
    def test_loss_and_grad_step_match_closed_form(self):
        adapted = _adapted("banded", d=1)  # the structured (slice) product
        adapted = {"dense": adapted["dense"]}  # one target keeps the un-jitted grad quick
        trainable, frozen = svft_jax.split(adapted)
        cotangents = {"dense": _cotangents()["dense"]}
        step = self.variant(jax.value_and_grad(_linear_loss))
        loss, grads = step(trainable, frozen, cotangents)
        expected_loss = sum(np.sum(_reference_kernel(adapted[n]["kernel"]) * cotangents[n]) for n in cotangents)
        np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5, atol=1e-4)
        for name in cotangents:
            np.testing.assert_allclose(np.asarray(grads[name]["kernel"].m),
                                       _omega_gradient(adapted[name]["kernel"], cotangents[name]),
                                       rtol=1e-4, atol=1e-4, err_msg=name)


# --- explicit pmap ---------------------------------------------------------------------------

def test_pmap_with_a_different_m_per_device_matches_single_device_merges():
    assert jax.device_count() == N_DEVICES, "conftest sets 8 virtual CPU devices"
    adapted = _adapted("random", k=6)
    node = adapted["stacked"]["kernel"]
    per_device_m = jnp.asarray(np.random.default_rng(3).normal(size=(N_DEVICES, *node.m.shape)), jnp.float32)
    trainable, frozen = svft_jax.split(adapted)
    trainable = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (N_DEVICES, *x.shape)), trainable)
    trainable["stacked"]["kernel"] = dataclasses.replace(trainable["stacked"]["kernel"], m=per_device_m)

    merged = jax.pmap(lambda t, f: svft_jax.merge(svft_jax.combine(t, f)), in_axes=(0, None))(trainable, frozen)
    single = jax.jit(svft_jax.merge)
    for device in range(N_DEVICES):
        one = single({"k": dataclasses.replace(node, m=per_device_m[device])})["k"]
        np.testing.assert_allclose(np.asarray(merged["stacked"]["kernel"][device]), np.asarray(one), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(one), _reference_kernel(node, per_device_m[device]), rtol=1e-5, atol=1e-5)


def test_data_parallel_pmean_gradient_equals_full_batch_gradient():
    # Each device sees one example's cotangents; pmean of per-device grads = grad of the mean loss.
    adapted = _adapted("banded", d=1)
    trainable, frozen = svft_jax.split(adapted)
    rng = np.random.default_rng(11)
    batch = {"dense": rng.normal(size=(N_DEVICES, 6, 5)).astype(np.float32),
             "stacked": rng.normal(size=(N_DEVICES, 2, 4, 5)).astype(np.float32)}

    def device_grad(train, froz, example):
        grads = jax.grad(_linear_loss)(train, froz, example)
        return jax.lax.pmean(grads, axis_name="batch")

    grads = jax.pmap(device_grad, axis_name="batch", in_axes=(None, None, 0))(trainable, frozen, batch)
    mean_cotangents = {name: value.mean(axis=0) for name, value in batch.items()}
    for name in batch:
        expected = _omega_gradient(adapted[name]["kernel"], mean_cotangents[name])
        for device in (0, N_DEVICES - 1):  # pmean leaves every replica equal
            np.testing.assert_allclose(np.asarray(grads[name]["kernel"].m[device]), expected, rtol=1e-4, atol=1e-5)


# --- vmap --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("pattern", "options", "name"),
    [("plain", {}, "dense"), ("banded", {"d": 2}, "stacked"), ("random", {"k": 6}, "stacked")],
)
def test_vmap_over_a_batch_of_m_equals_a_python_loop(pattern, options, name):
    node = _adapted(pattern, **options)[name]["kernel"]
    batch_m = jnp.asarray(np.random.default_rng(4).normal(size=(5, *node.m.shape)), jnp.float32)
    one = jax.jit(lambda m: svft_jax.merge({"k": dataclasses.replace(node, m=m)})["k"])
    batched = jax.vmap(one)(batch_m)
    looped = jnp.stack([one(m) for m in batch_m])
    assert batched.shape == (5, *node.meta.layout.shape)
    np.testing.assert_allclose(np.asarray(batched), np.asarray(looped), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(looped[2], np.float64), _reference_kernel(node, batch_m[2]), rtol=1e-5, atol=1e-5)
