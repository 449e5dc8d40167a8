"""svft_jax.distributed on the 8 virtual CPU devices: data parallelism (jit + NamedSharding
and pmap), FSDP-style sharding of frozen weights, and SVD of weights already on a mesh.

Truth: the single-device run of the same step. Data parallelism only changes where the sum
over examples happens, so losses and M must agree to float32 round-off.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import svft_jax
from svft_jax import distributed
from svft_jax.training import losses, make_train_step

HEAD = "head/.*"
STEPS = 3


def tiny_problem(batch_size=32):
    rng = np.random.default_rng(1)
    params = {
        "layer1": {"kernel": rng.normal(size=(16, 32)).astype(np.float32) / 4, "bias": np.zeros(32, np.float32)},
        "layer2": {"kernel": rng.normal(size=(32, 24)).astype(np.float32) / 4},
        "head": {"kernel": rng.normal(size=(24, 3)).astype(np.float32) / 4},
    }
    batch = {"x": rng.normal(size=(batch_size, 16)).astype(np.float32), "y": rng.integers(0, 3, batch_size)}
    return params, batch


def loss_fn(adapted, batch, rng):
    del rng
    params = svft_jax.merge(adapted)
    hidden = jnp.tanh(batch["x"] @ params["layer1"]["kernel"] + params["layer1"]["bias"])
    hidden = jnp.tanh(hidden @ params["layer2"]["kernel"])
    return losses.classification_loss(hidden @ params["head"]["kernel"], batch["y"])


PARAMS, BATCH = tiny_problem()
ADAPTED = svft_jax.apply(PARAMS, "banded", d=2, svd_backend="numpy")
TX = svft_jax.optimizer(optax.adam(3e-2), ADAPTED, extra=HEAD, extra_tx=optax.adam(1e-2))


def run_jit(num_devices, *, accumulation_steps=1, model=1, fsdp=False):
    """STEPS steps of the jit step; the batch sharded over a (data, model) mesh when devices > 1."""
    trainable, frozen = svft_jax.split(ADAPTED, extra=HEAD)
    opt_state = TX.init(trainable)
    batch = BATCH
    if num_devices > 1:
        mesh = distributed.make_mesh(num_devices // model, model)
        trainable = distributed.shard_params(trainable, mesh, extra=HEAD)
        frozen = distributed.shard_params(frozen, mesh, fsdp=fsdp, extra=HEAD, min_size=256)
        opt_state = distributed.replicate(opt_state, mesh)
        batch = distributed.shard_batch(BATCH, mesh)
    step = make_train_step(loss_fn, TX, accumulation_steps=accumulation_steps)
    history = []
    for i in range(STEPS):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(i))
        history.append(float(metrics["loss"]))
    return distributed.gather_to_host(trainable), np.array(history), frozen


def run_pmap(num_devices):
    devices = jax.devices()[:num_devices]
    trainable, frozen = svft_jax.split(ADAPTED, extra=HEAD)
    trainable, frozen, opt_state = distributed.replicate_for_pmap((trainable, frozen, TX.init(trainable)), devices)
    step = distributed.make_pmap_train_step(loss_fn, TX, devices=devices)
    batch = distributed.split_for_pmap(BATCH, num_devices)
    history = []
    for i in range(STEPS):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(i))
        history.append(float(metrics["loss"][0]))
    return distributed.gather_to_host(distributed.unreplicate(trainable)), np.array(history)


REFERENCE = {}


def reference():
    if not REFERENCE:
        REFERENCE["run"] = run_jit(1)
    return REFERENCE["run"]


def max_abs_diff(tree_a, tree_b):
    return max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(tree_a), jax.tree_util.tree_leaves(tree_b), strict=True))


@pytest.mark.parametrize("num_devices", [2, 8])
@pytest.mark.parametrize("route", ["jit_sharding", "pmap"])
def test_data_parallel_training_matches_single_device(route, num_devices):
    ref_trainable, ref_history, _ = reference()
    if route == "jit_sharding":
        trainable, history, _ = run_jit(num_devices)
    else:
        trainable, history = run_pmap(num_devices)
    assert ref_history[-1] < ref_history[0]  # it really trains
    np.testing.assert_allclose(history, ref_history, rtol=1e-5)
    diff = max_abs_diff(trainable, ref_trainable)
    print(f"{route} {num_devices} devices: max |ΔM, Δhead| = {diff:.2e}, max |Δloss| = {np.max(np.abs(history - ref_history)):.2e}")
    assert diff < 1e-5


def test_sharded_accumulation_matches_single_device_full_batch():
    ref_trainable, ref_history, _ = reference()
    trainable, history, _ = run_jit(8, accumulation_steps=2)
    np.testing.assert_allclose(history, ref_history, rtol=1e-5)
    assert max_abs_diff(trainable, ref_trainable) < 1e-5


def test_fsdp_shards_frozen_factors_over_model_axis_and_matches_single_device():
    ref_trainable, ref_history, _ = reference()
    trainable, history, frozen = run_jit(8, model=4, fsdp=True)
    node = frozen["layer1"]["kernel"]
    assert node.u.sharding.spec == P(None, "model") or node.u.sharding.spec == P("model")
    assert node.u.sharding.shard_shape(node.u.shape)[0] == node.u.shape[0] // 4  # U (32, 16): rows split 4 ways
    assert node.base.sharding.shard_shape(node.base.shape) != node.base.shape
    np.testing.assert_allclose(history, ref_history, rtol=1e-5)
    assert max_abs_diff(trainable, ref_trainable) < 1e-5


def test_param_shardings_replicate_trainable_and_small_leaves():
    mesh = distributed.make_mesh(2, 4)
    shardings = distributed.param_shardings(ADAPTED, mesh, fsdp=True, extra=HEAD, min_size=256)
    node = shardings["layer2"]["kernel"]
    assert node.m.spec == P() and node.s.spec == P()  # M and s are tiny: replicated
    assert node.u.spec == P("model") and node.v.spec == P("model")  # U (24, 24)→rows, V (32, 24)→rows
    assert shardings["head"]["kernel"].spec == P()  # trainable extra: replicated
    assert shardings["layer1"]["bias"].spec == P()  # below min_size


def test_apply_on_weights_already_sharded_over_the_mesh_equals_host_apply():
    mesh = distributed.make_mesh(2, 4)
    sharded_params = distributed.shard_params(PARAMS, mesh, fsdp=True, min_size=256)
    assert not sharded_params["layer1"]["kernel"].sharding.is_fully_replicated
    from_mesh = svft_jax.apply(sharded_params, "banded", d=2)
    from_host = svft_jax.apply(PARAMS, "banded", d=2, svd_backend="numpy")  # LAPACK on the host
    for name in ("layer1", "layer2"):
        a, b = from_mesh[name]["kernel"], from_host[name]["kernel"]
        for field in ("u", "s", "v"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-5)
        # The factors reproduce the weight: U diag(s) Vᵀ = W0ᵀ.
        np.testing.assert_allclose(np.asarray(a.u * a.s) @ np.asarray(a.v).T, PARAMS[name]["kernel"].T, atol=1e-5)
    np.testing.assert_allclose(svft_jax.merge(from_mesh)["layer2"]["kernel"], PARAMS["layer2"]["kernel"], atol=1e-6)


def test_bad_mesh_and_batch_sizes_fail_clearly():
    with pytest.raises(ValueError, match="model=3 does not divide"):
        distributed.make_mesh(model=3)
    with pytest.raises(ValueError, match=r"data=16"):
        distributed.make_mesh(16)
    mesh = distributed.make_mesh(8)
    with pytest.raises(ValueError, match=r"global batch size \(12\) must be divisible by the mesh's data axis \(8\)"):
        distributed.shard_batch({"x": np.zeros((12, 2))}, mesh)
    with pytest.raises(ValueError, match="divisible by the 8 devices"):
        distributed.split_for_pmap({"x": np.zeros((12, 2))}, 8)
