"""One process of the two-process SVFT training test (launched by tests/test_multihost.py).

    python tests/_multihost_worker.py PROCESS_ID NUM_PROCESSES COORDINATOR_PORT LOCAL_DEVICES OUT_JSON

Each process joins the cluster with `jax.distributed.initialize` (CPU collectives: gloo, the
default since jax 0.4.23), builds the same adapted MLP (deterministic numpy weights, SVD on
the host), feeds ITS half of every global batch, and trains a few steps over the global
("data", "model") mesh. It writes its per-step losses and final M / head to OUT_JSON.

`build_problem` and `train` are also imported by the test for the single-process reference.
"""

import json
import os
import sys

GLOBAL_BATCH = 16
STEPS = 3
HEAD = "head/.*"


def build_problem():
    """(adapted, optimiser, global batches, loss_fn): identical in every process."""
    import jax.numpy as jnp
    import numpy as np
    import optax

    import svft_jax
    from svft_jax.training import losses

    rng = np.random.default_rng(5)
    params = {
        "layer1": {"kernel": rng.normal(size=(8, 16)).astype(np.float32) / 3},
        "layer2": {"kernel": rng.normal(size=(16, 12)).astype(np.float32) / 3},
        "head": {"kernel": rng.normal(size=(12, 4)).astype(np.float32) / 3},
    }
    # One fixed batch repeated, so the loss must fall step after step.
    batch = {"x": rng.normal(size=(GLOBAL_BATCH, 8)).astype(np.float32), "y": rng.integers(0, 4, GLOBAL_BATCH)}
    batches = [batch] * STEPS
    adapted = svft_jax.apply(params, "banded", d=1, svd_backend="numpy")
    tx = svft_jax.optimizer(optax.adam(3e-2), adapted, extra=HEAD, extra_tx=optax.adam(1e-2))

    def loss_fn(adapted, batch, rng):
        del rng
        merged = svft_jax.merge(adapted)
        hidden = jnp.tanh(jnp.tanh(batch["x"] @ merged["layer1"]["kernel"]) @ merged["layer2"]["kernel"])
        return losses.classification_loss(hidden @ merged["head"]["kernel"], batch["y"])

    return adapted, tx, batches, loss_fn


def train(mesh, process_index: int, process_count: int):
    """Train STEPS steps on `mesh`; this process feeds rows [i·B/P, (i+1)·B/P) of each batch.

    Returns:
      (losses: list of floats, trainable as a dict of numpy arrays keyed by path).
    """
    import jax

    import svft_jax
    from svft_jax import distributed
    from svft_jax.training import make_train_step

    adapted, tx, batches, loss_fn = build_problem()
    trainable, frozen = svft_jax.split(adapted, extra=HEAD)
    opt_state = tx.init(trainable)
    trainable = distributed.shard_params(trainable, mesh, extra=HEAD)
    frozen = distributed.shard_params(frozen, mesh, fsdp=True, extra=HEAD, min_size=64)
    opt_state = distributed.replicate(opt_state, mesh)
    step = make_train_step(loss_fn, tx)
    rows = GLOBAL_BATCH // process_count
    history = []
    for i, batch in enumerate(batches):
        local = jax.tree_util.tree_map(lambda x: x[process_index * rows : (process_index + 1) * rows], batch)
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, distributed.shard_batch(local, mesh), jax.random.key(i))
        history.append(float(distributed.gather_to_host(metrics["loss"])))
    host = distributed.gather_to_host(trainable)
    flat = {jax.tree_util.keystr(path): leaf.tolist() for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]}
    return history, flat


def main(argv):
    process_id, num_processes, port, local_devices, out_path = int(argv[1]), int(argv[2]), argv[3], int(argv[4]), argv[5]
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id,
        initialization_timeout=40,
    )
    from svft_jax import distributed

    assert jax.process_count() == num_processes and jax.local_device_count() == local_devices
    # data × model = all global devices; the model axis (FSDP of frozen factors) stays
    # within a process when local_devices is even, so each process holds whole data shards.
    model = 2 if local_devices % 2 == 0 else 1
    mesh = distributed.make_mesh(jax.device_count() // model, model)
    history, trainable = train(mesh, jax.process_index(), jax.process_count())
    with open(out_path, "w") as f:
        json.dump({"process_index": jax.process_index(), "device_count": jax.device_count(), "losses": history, "trainable": trainable}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
