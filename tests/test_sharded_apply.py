"""Sharded apply: the SVDs split over a mesh's devices (and processes) give the factors of the
single-device apply, and a factor store written by it serves any later run.

Truths:
- 8 virtual CPU devices: `apply(..., mesh=mesh)` equals `apply(...)` bit for bit with the same
  SVD back-end (LAPACK per device through a callback, or XLA's SVD per device), on 2-D and
  stacked kernels, host and device-sharded inputs, every pattern's Ω; with fsdp the factors
  are split over "model".
- Two processes (`jax.distributed` on 127.0.0.1) with kernels no process can address whole:
  both see the single-process factors bit for bit; their store shards together hold every
  target, and a later single-process apply reads them and runs no SVD.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import _sharded_apply_worker as worker
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import svft_jax
from svft_jax import distributed
from svft_jax.checkpoint import load_factor_cache, save_factor_shard
from svft_jax.transform import _factorize

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60


def _params(seed=0):
    rng = np.random.default_rng(seed)
    params = {f"w{i}": {"kernel": rng.normal(size=(16, 24)).astype(np.float32)} for i in range(5)}
    params["up"] = {"kernel": rng.normal(size=(24, 40)).astype(np.float32)}
    params["ScanDense_0"] = {"kernel": rng.normal(size=(8, 64, 48)).astype(np.float32)}
    return params


def _nodes(adapted):
    return {p: x for p, x in svft_jax.transform._targets.flatten_by_path(adapted).items() if svft_jax.is_node(x)}


def _assert_same(sharded, reference, exact=True):
    a, b = _nodes(sharded), _nodes(reference)
    assert list(a) == list(b)
    for path in a:
        assert a[path].meta == b[path].meta, path  # plan, Ω and near-repeated count
        for field in ("u", "s", "v", "m"):
            x, y = np.asarray(getattr(a[path], field)), np.asarray(getattr(b[path], field))
            if exact:
                np.testing.assert_array_equal(x, y, err_msg=f"{path}.{field}")
            else:
                np.testing.assert_allclose(x, y, atol=2e-5, err_msg=f"{path}.{field}")


@pytest.mark.parametrize("backend", ["numpy", "jax"])
@pytest.mark.parametrize("pattern, options", [("banded", dict(d=2)), ("topk", dict(k=20))])
def test_mesh_apply_equals_single_device_apply(backend, pattern, options):
    params = _params()
    mesh = distributed.make_mesh(8, 1)
    reference = svft_jax.apply(params, pattern, svd_backend=backend, targets=".*kernel", **options)
    sharded = svft_jax.apply(params, pattern, svd_backend=backend, targets=".*kernel", mesh=mesh, svd_batch=1, **options)
    _assert_same(sharded, reference)
    node = sharded["ScanDense_0"]["kernel"]
    assert node.u.sharding.is_fully_replicated and len(node.u.sharding.device_set) == 8


def test_mesh_apply_from_device_sharded_kernels_with_fsdp_factors():
    params = _params(1)
    mesh = distributed.make_mesh(4, 2)
    row_split = NamedSharding(mesh, PartitionSpec("data"))
    on_mesh = jax.tree_util.tree_map(lambda x: jax.device_put(x, row_split if x.shape[0] % 4 == 0 else NamedSharding(mesh, PartitionSpec())), params)
    reference = svft_jax.apply(params, "banded", d=1, svd_backend="numpy", targets=".*kernel")
    sharded = svft_jax.apply(on_mesh, "banded", d=1, svd_backend="numpy", targets=".*kernel", mesh=mesh, fsdp=True)
    _assert_same(sharded, reference)
    u = sharded["ScanDense_0"]["kernel"].u  # (8, 48, 48), ≥ 2**12 entries: its largest axis divisible by model=2 is split
    assert u.sharding.spec != PartitionSpec() and "model" in str(u.sharding.spec)
    with pytest.raises(ValueError, match="'model' mesh axis"):
        svft_jax.apply(params, "plain", targets=".*kernel", mesh=jax.make_mesh((8,), ("x",)), fsdp=True, svd_backend="numpy")
    with pytest.raises(ValueError, match="not available with a mesh"):
        svft_jax.apply(params, "plain", targets="up/kernel", rank=4, mesh=mesh, svd_backend="randomized")


def test_store_written_by_mesh_apply_serves_a_later_run(tmp_path, monkeypatch):
    params = _params(2)
    mesh = distributed.make_mesh(8, 1)
    store = {}
    sharded = svft_jax.apply(params, "banded", d=1, svd_backend="numpy", targets=".*kernel", mesh=mesh, factors=store)
    assert len(store) == 7
    save_factor_shard(tmp_path / "store", store)
    loaded = load_factor_cache(tmp_path / "store")
    assert set(loaded) == set(store)

    def refuse(*args, **kwargs):
        raise AssertionError("factors come from the store")

    monkeypatch.setattr(_factorize, "svd_factors", refuse)
    monkeypatch.setattr(_factorize, "_mesh_svd", refuse)
    again = svft_jax.apply(params, "banded", d=1, svd_backend="numpy", targets=".*kernel", factors=loaded)
    _assert_same(again, sharded)
    on_mesh = svft_jax.apply(params, "banded", d=1, svd_backend="numpy", targets=".*kernel", factors=loaded, mesh=mesh)
    _assert_same(on_mesh, sharded)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_factorise_non_addressable_kernels(tmp_path, monkeypatch):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, worker.__file__, str(i), "2", str(port), "2", str(tmp_path)], env=env,
                              cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {i} exited with {proc.returncode}:\n" + "\n".join(logs)[-4000:]
    results = [np.load(tmp_path / f"process_{i}.npz") for i in range(2)]
    assert not any(bool(r["addressable"]) for r in results)  # the kernels really spanned both processes
    reference = svft_jax.apply(worker.build_params(), targets=worker.TARGETS, **worker.PATTERN)
    for result in results:
        for path in ("a", "b", "c", "ScanDense_0"):
            node = reference[path]["kernel"]
            for field in ("u", "s", "v"):
                np.testing.assert_array_equal(result[f"{path}.{field}"], np.asarray(getattr(node, field)), err_msg=f"{path}.{field}")
            np.testing.assert_array_equal(result[f"{path}.rows"], node.meta.rows.array)
    shards = sorted((tmp_path / "store").glob("*.safetensors"))
    assert len(shards) == 2  # four targets, owned two per process
    store = load_factor_cache(tmp_path / "store")
    assert len(store) == 4
    monkeypatch.setattr(_factorize, "svd_factors", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no SVD")))
    again = svft_jax.apply(worker.build_params(), targets=worker.TARGETS, factors=store, **worker.PATTERN)
    _assert_same(again, reference)
