"""One process of the two-process sharded-apply test (launched by tests/test_sharded_apply.py).

    python tests/_sharded_apply_worker.py PROCESS_ID NUM_PROCESSES COORDINATOR_PORT LOCAL_DEVICES OUT_DIR

Each process joins the cluster (`jax.distributed.initialize`, CPU collectives over gloo), puts
the same deterministic kernels on a global ("data", "model") mesh with their rows split over
"data" — so no process can address a whole kernel — and runs `svft_jax.apply(..., mesh=mesh,
factors=store)`: each device factorises its share. It writes the factors it sees (host copies
of the replicated results) to OUT_DIR/process_<i>.npz and its factor-store shard to
OUT_DIR/store/.

`build_params` is also imported by the test for the single-process reference.
"""

import os
import sys

PATTERN = dict(pattern="banded", d=1, svd_backend="numpy")


def build_params():
    """Deterministic float32 kernels: two shapes, one of them a stacked (layers, in, out) kernel."""
    import numpy as np

    rng = np.random.default_rng(11)
    return {
        "a": {"kernel": rng.normal(size=(8, 12)).astype(np.float32)},
        "b": {"kernel": rng.normal(size=(8, 12)).astype(np.float32)},
        "c": {"kernel": rng.normal(size=(12, 8)).astype(np.float32)},
        "ScanDense_0": {"kernel": rng.normal(size=(3, 8, 12)).astype(np.float32)},
    }


TARGETS = "(a|b|c|ScanDense_0)/kernel"


def main(argv):
    process_id, num_processes, port, local_devices, out_dir = int(argv[1]), int(argv[2]), argv[3], int(argv[4]), argv[5]
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=40)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    import svft_jax
    from svft_jax import distributed
    from svft_jax.checkpoint import save_factor_shard

    mesh = distributed.make_mesh(jax.device_count(), 1)
    host = build_params()

    def shard(x):  # rows of the last-but-one axis over "data": a kernel spans both processes
        spec = PartitionSpec(*([None] * (x.ndim - 2)), "data", None) if x.shape[-2] % mesh.shape["data"] == 0 else PartitionSpec()
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])

    params = jax.tree_util.tree_map(shard, host)
    addressable = all(x.is_fully_addressable for x in jax.tree_util.tree_leaves(params))
    store = {}
    adapted = svft_jax.apply(params, targets=TARGETS, mesh=mesh, factors=store, **PATTERN)
    out = {"addressable": np.array(addressable)}
    for path in ("a", "b", "c", "ScanDense_0"):
        node = adapted[path]["kernel"]
        for field in ("u", "s", "v"):
            value = getattr(node, field)
            assert value.is_fully_replicated
            out[f"{path}.{field}"] = np.asarray(value.addressable_data(0))
        out[f"{path}.rows"] = node.meta.rows.array
    np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **out)
    save_factor_shard(os.path.join(out_dir, "store"), store)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv)
