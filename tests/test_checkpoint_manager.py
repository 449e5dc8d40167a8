"""TrainCheckpointer: exact resume after SIGKILL, half-written steps, retention, round trips."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import _resume_worker as worker
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import svft_jax
from svft_jax.checkpoint import TrainCheckpointer

WORKER = Path(__file__).with_name("_resume_worker.py")
STEPS, EVERY = 15, 5


def _tiny_state(seed: int = 0, pattern: str = "banded", d: int = 1):
    g = np.random.default_rng(seed)
    params = {
        "layer": {"kernel": jnp.asarray(g.normal(size=(6, 5)), jnp.float32)},
        "classifier": {"kernel": jnp.asarray(g.normal(size=(5, 3)), jnp.float32), "bias": jnp.zeros(3)},
    }
    adapted = svft_jax.apply(params, pattern, d=d, targets="layer/kernel", svd_backend="numpy")
    trainable, _ = svft_jax.split(adapted, extra="classifier/.*")
    tx = svft_jax.optimizer(optax.adam(1e-2), extra="classifier/.*")
    return trainable, tx


def _perturbed(tree, scale: float):
    return jax.tree_util.tree_map(lambda x: x + scale, tree)


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_sigkill_mid_run_then_resume_is_bit_identical_to_uninterrupted_run(tmp_path):
    killed_dir, out = tmp_path / "killed", tmp_path / "resumed.npz"
    # Slow steps so the kill lands mid-run (the kill, not the sleep, ends the process).
    first = subprocess.Popen(
        [sys.executable, str(WORKER), str(killed_dir), str(tmp_path / "never.npz"),
         "--steps", str(STEPS), "--every", str(EVERY), "--step-seconds", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        # The uninterrupted reference runs here meanwhile (same code, same CPU flags).
        reference = worker.flat_state(*worker.run(tmp_path / "reference", STEPS, EVERY))
        deadline = time.monotonic() + 120
        while not (killed_dir / str(EVERY) / "commit_success.txt").exists():
            assert first.poll() is None, "worker exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    assert not (tmp_path / "never.npz").exists()  # it really was interrupted

    second = subprocess.run(
        [sys.executable, str(WORKER), str(killed_dir), str(out), "--steps", str(STEPS), "--every", str(EVERY)],
        capture_output=True, text=True, timeout=300,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"saved {EVERY}\n" not in second.stdout  # it resumed after a checkpoint, not from scratch
    resumed = dict(np.load(out))
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert np.array_equal(resumed[name], reference[name]), name


def test_step_without_commit_marker_or_tmp_dir_is_never_restored_and_is_cleaned(tmp_path):
    trainable, tx = _tiny_state()
    opt_state = tx.init(trainable)
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, trainable, opt_state)
        ckpt.save(2, _perturbed(trainable, 1.0), opt_state)
    # A later step that was half written or half deleted: no commit marker; and a tmp dir.
    shutil.copytree(tmp_path / "2", tmp_path / "3")
    (tmp_path / "3" / "commit_success.txt").unlink()
    shutil.copytree(tmp_path / "2", tmp_path / "4.orbax-checkpoint-tmp")
    (tmp_path / "5.incomplete-20261130-120000").mkdir()  # what earlier versions set aside

    ckpt = TrainCheckpointer(tmp_path)
    assert ckpt.all_steps() == [1, 2]
    restored = ckpt.restore_latest(trainable, opt_state)
    assert restored.step == 2
    _assert_trees_equal(restored.trainable, _perturbed(trainable, 1.0))
    # Opening for writing removed all of it (none of it can ever be restored) ...
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith((".", "_", "svft"))) == ["1", "2"]
    # ... and step 3 can be saved again.
    ckpt.save(3, _perturbed(trainable, 2.0), opt_state)
    _assert_trees_equal(ckpt.restore_latest(trainable, opt_state).trainable, _perturbed(trainable, 2.0))
    # A marker-less step appearing while a checkpointer is open is ignored too.
    shutil.copytree(tmp_path / "3", tmp_path / "9")
    (tmp_path / "9" / "commit_success.txt").unlink()
    assert ckpt.latest_step() == 3
    ckpt.close()


def test_retention_keeps_newest_and_best_and_best_step_restores_its_values(tmp_path):
    trainable, tx = _tiny_state()
    opt_state = tx.init(trainable)
    accuracies = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3, 5: 0.4, 6: 0.5}
    with TrainCheckpointer(tmp_path, max_to_keep=2, best_metric="accuracy", best_mode="max") as ckpt:
        for step, accuracy in accuracies.items():
            ckpt.save(step, _perturbed(trainable, float(step)), opt_state, {"accuracy": accuracy})
        assert ckpt.all_steps() == [2, 5, 6]  # best (2) + newest two
        assert ckpt.best_step() == 2
        best = ckpt.restore(ckpt.best_step(), trainable, opt_state)
    assert best.metrics == {"accuracy": pytest.approx(0.9)}
    _assert_trees_equal(best.trainable, _perturbed(trainable, 2.0))
    with TrainCheckpointer(tmp_path, max_to_keep=1, best_metric="loss", best_mode="min") as ckpt:
        assert ckpt.best_metric == "loss"
        with pytest.raises(ValueError, match="best_metric='loss' is not in metrics"):
            ckpt.save(7, trainable, opt_state, {"accuracy": 1.0})


def test_restore_returns_same_structure_values_rng_and_data_position(tmp_path):
    trainable, tx = _tiny_state()
    trainable = jax.tree_util.tree_map(lambda x: x + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), trainable)
    opt_state = tx.init(trainable)
    _, opt_state = tx.update(trainable, opt_state, trainable)  # non-trivial moments and count
    rng = jax.random.split(jax.random.key(7))[1]
    position = {"epoch": 3, "index": 1234, "shuffle_seed": 5}
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(10, trainable, opt_state, {"loss": jnp.float32(0.25)}, rng=rng, data_position=position)
    fresh_trainable, fresh_tx = _tiny_state()  # a new process would rebuild templates like this
    restored = TrainCheckpointer(tmp_path).restore_latest(fresh_trainable, fresh_tx.init(fresh_trainable))
    assert restored.step == 10 and restored.data_position == position and restored.metrics == {"loss": 0.25}
    _assert_trees_equal(restored.trainable, trainable)
    _assert_trees_equal(restored.opt_state, opt_state)
    assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(restored.rng), jax.random.key_data(rng))


def test_fresh_directory_has_no_latest_and_steps_must_increase(tmp_path):
    trainable, tx = _tiny_state()
    with TrainCheckpointer(tmp_path / "new" / "ckpt") as ckpt:
        assert ckpt.restore_latest(trainable) is None and ckpt.latest_step() is None
        ckpt.save(5, trainable)
        with pytest.raises(ValueError, match="not after the latest saved step 5"):
            ckpt.save(5, trainable)
        restored = ckpt.restore_latest(trainable)
    assert restored.opt_state is None and restored.rng is None and restored.data_position is None
    assert os.path.isfile(tmp_path / "new" / "ckpt" / "svft_jax_checkpoints.json")


def test_steps_without_metrics_are_pruned_by_recency_and_never_ranked_best(tmp_path):
    trainable, _ = _tiny_state()
    with TrainCheckpointer(tmp_path, max_to_keep=1, best_metric="accuracy") as ckpt:
        ckpt.save(1, trainable, metrics={"accuracy": 0.8})
        for step in (2, 3, 4):
            ckpt.save(step, _perturbed(trainable, float(step)), None, {})  # no eval at these steps
        assert ckpt.all_steps() == [1, 4]
        assert ckpt.best_step() == 1
        step, restored, opt_state = ckpt.restore_latest(trainable)  # the driver's unpacking
    assert step == 4 and opt_state is None
    _assert_trees_equal(restored, _perturbed(trainable, 4.0))


def test_restore_places_arrays_with_the_template_sharding(tmp_path):
    trainable, _ = _tiny_state()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    trainable = jax.device_put(trainable, replicated)
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, trainable)
        restored = ckpt.restore_latest(trainable)
    for want, got in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(restored.trainable), strict=True):
        assert got.sharding == want.sharding
        assert np.array_equal(got, want)
