"""TrainCheckpointer integrity: a step restores only onto the adapter it was trained for, and
the directory survives NaN metrics, edits, read-only mounts, a second writer and a full disk.

Truths: the refused templates really have the same array shapes (so only the recorded
configuration, Ω digest or base fingerprint can tell them apart), the accepted one restores
bit-identically; retention is checked against the steps a correct NaN-worst ranking keeps;
edits are made to the bytes on disk; read-only and disk-full run on real mounts (a read-only
bind mount and a 2 MiB tmpfs in a user namespace, skipped where `unshare` is not allowed).
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import _checkpoint_worker as worker
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_checkpoint_kills import _Worker

import svft_jax
from svft_jax.checkpoint import TrainCheckpointer
from svft_jax.checkpoint.manager import CheckpointWarning

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_checkpoint_worker.py")


def _base(seed: int = 0):
    g = np.random.default_rng(seed)
    return {"layer": {"kernel": jnp.asarray(g.normal(size=(8, 8)), jnp.float32)}}


def _halves(base, pattern="banded", **kwargs):
    trainable, frozen = svft_jax.split(svft_jax.apply(base, pattern, svd_backend="numpy", **kwargs))
    trainable = jax.tree_util.tree_map(lambda x: x + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), trainable)
    return trainable, frozen


def _shapes(tree):
    return [(np.shape(x), jnp.result_type(x)) for x in jax.tree_util.tree_leaves(tree)]


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_unshare = pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rm` (user + mount namespaces) to mount")


# ------------------------------------------------------------------ item 1: the right adapter
def test_template_with_other_pattern_seed_base_or_topk_omega_is_refused_naming_target_and_field(tmp_path):
    base, other_base = _base(0), _base(5)
    trained, frozen = _halves(base, "banded", d=1)
    with TrainCheckpointer(tmp_path / "banded", frozen=frozen) as ckpt:
        ckpt.save(1, trained)
    cases = {  # template: (frozen, what the message must name)
        "random d=1 (same |Ω|)": (_halves(base, "random", d=1), r"differs in \[[^]]*'pattern'[^]]*\].*pattern: 'banded' in the checkpoint, 'random' in the template"),
        "banded d=1 on another base": (_halves(other_base, "banded", d=1), r"different base weights: target 'layer/kernel' differs in \['sha256'\]"),
    }
    for name, ((template, template_frozen), message) in cases.items():
        assert _shapes(template) == _shapes(trained), name  # shapes alone cannot tell
        with pytest.raises(ValueError, match=message), TrainCheckpointer(tmp_path / "banded", frozen=template_frozen) as ckpt:
            ckpt.restore_latest(template)
    # The template it was trained for restores bit-identically.
    template, _ = svft_jax.split(svft_jax.apply(base, "banded", d=1, svd_backend="numpy"))
    with TrainCheckpointer(tmp_path / "banded", frozen=frozen) as ckpt:
        restored = ckpt.restore_latest(template)
    for a, b in zip(jax.tree_util.tree_leaves(restored.trainable), jax.tree_util.tree_leaves(trained), strict=True):
        assert np.array_equal(a, b)

    random_seed0, frozen_seed0 = _halves(base, "random", k=10, seed=0)
    with TrainCheckpointer(tmp_path / "random", frozen=frozen_seed0) as ckpt:
        ckpt.save(1, random_seed0)
        seed1, _ = _halves(base, "random", k=10, seed=1)
        assert _shapes(seed1) == _shapes(random_seed0)
        with pytest.raises(ValueError, match=r"differs in \['omega_sha256', 'seed'\].*seed: 0 in the checkpoint, 1 in the template"):
            ckpt.restore_latest(seed1)

    topk, _ = _halves(base, "topk", k=12)
    with TrainCheckpointer(tmp_path / "topk") as ckpt:  # without frozen=: Ω alone differs
        ckpt.save(1, topk)
        other_topk, _ = _halves(other_base, "topk", k=12)
        assert _shapes(other_topk) == _shapes(topk)
        with pytest.raises(ValueError, match=r"target 'layer/kernel' differs in \['omega_sha256'\]"):
            ckpt.restore_latest(other_topk)


def test_checkpoint_that_records_its_base_needs_frozen_to_restore(tmp_path):
    trained, frozen = _halves(_base(), "banded", d=1)
    with TrainCheckpointer(tmp_path, frozen=frozen) as ckpt:
        ckpt.save(1, trained)
    with TrainCheckpointer(tmp_path) as ckpt, pytest.raises(ValueError, match="records the base weights it was trained on; pass `frozen=`"):
        ckpt.restore_latest(trained)
    with pytest.raises(ValueError, match="`frozen` has no adapter nodes"):
        TrainCheckpointer(tmp_path / "x", frozen={"a": jnp.zeros(3)})


# ------------------------------------------------------------------ item 11: NaN metrics
def test_nan_accuracy_never_deletes_the_best_checkpoint(tmp_path):
    trained, frozen = _halves(_base(), "banded", d=1)
    with TrainCheckpointer(tmp_path / "acc", max_to_keep=1, best_metric="accuracy", frozen=frozen) as ckpt:
        for step, accuracy in enumerate([0.6, 0.8, float("nan"), 0.7], start=1):
            if np.isnan(accuracy):
                with pytest.warns(CheckpointWarning, match="ranked worst"):
                    ckpt.save(step, jax.tree_util.tree_map(lambda x, s=step: x + s, trained), None, {"accuracy": accuracy})
            else:
                ckpt.save(step, jax.tree_util.tree_map(lambda x, s=step: x + s, trained), None, {"accuracy": accuracy})
        assert ckpt.all_steps() == [2, 4]  # the best (.8) and the latest
        assert ckpt.best_step() == 2
        assert ckpt.restore(2, trained).metrics == {"accuracy": pytest.approx(0.8)}
    # "min" mode: NaN and inf losses rank worst as well.
    with TrainCheckpointer(tmp_path / "loss", max_to_keep=1, best_metric="loss", best_mode="min") as ckpt:
        with pytest.warns(CheckpointWarning):
            for step, loss in enumerate([0.5, float("nan"), 0.3, float("inf"), 0.4], start=1):
                ckpt.save(step, trained, None, {"loss": loss})
        assert ckpt.all_steps() == [3, 5] and ckpt.best_step() == 3


# ------------------------------------------------------------------ item 14: edits, read-only, lock, disk
def test_edited_or_renamed_step_metadata_is_refused(tmp_path):
    trained, frozen = _halves(_base(), "banded", d=1)
    with TrainCheckpointer(tmp_path, max_to_keep=None, frozen=frozen) as ckpt:
        ckpt.save(5, trained, None, {"loss": 0.5})
    meta_file = tmp_path / "5" / "meta" / "metadata"
    original = meta_file.read_text()
    for edit in ({"step": 7}, {"metrics": {"loss": 0.1}}, {"data_position": 123}):
        meta_file.write_text(json.dumps({**json.loads(original), **edit}))
        with TrainCheckpointer(tmp_path, frozen=frozen) as ckpt, pytest.raises(ValueError, match="damaged or was edited"):
            ckpt.restore(5, trained)
    meta_file.write_text(original)
    shutil.copytree(tmp_path / "5", tmp_path / "7")  # folder 5 presented as step 7
    with TrainCheckpointer(tmp_path, frozen=frozen) as ckpt:
        with pytest.raises(ValueError, match="records step 5; the folder was renamed or edited"):
            ckpt.restore(7, trained)
        assert ckpt.restore(5, trained).step == 5


def test_read_only_restore_writes_nothing_and_refuses_to_save(tmp_path):
    trained, frozen = _halves(_base(), "banded", d=1)
    with TrainCheckpointer(tmp_path, frozen=frozen) as ckpt:
        ckpt.save(3, trained)
    with TrainCheckpointer(tmp_path, frozen=frozen) as writer:  # a live writer holds the lock ...
        # (taken after the writer opened: it records itself, with the time, in the lock file)
        before = _snapshot(tmp_path)
        reader = TrainCheckpointer(tmp_path, read_only=True, frozen=frozen)  # ... a reader needs none
        restored = reader.restore_latest(trained)
        with pytest.raises(ValueError, match="read_only=True"):
            reader.save(4, trained)
        reader.close()
        assert restored.step == 3 and _snapshot(tmp_path) == before
        assert writer.latest_step() == 3
    with pytest.raises(ValueError, match="needs an existing svft-jax checkpoint directory"):
        TrainCheckpointer(tmp_path / "missing", read_only=True)


@needs_unshare
def test_restore_from_a_read_only_mount(tmp_path):
    directory = tmp_path / "ckpt"
    trainable, frozen, tx = worker.train_state()
    with TrainCheckpointer(directory, frozen=frozen) as ckpt:
        ckpt.save(4, worker.at_step(trainable, 4), tx.init(trainable))
    before = _snapshot(directory)
    script = (f"mount --bind {directory} {directory} && mount -o remount,bind,ro {directory} {directory} && "
              f"! touch {directory}/probe 2>/dev/null && {sys.executable} {WORKER} restore {directory}")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "restored 4" in result.stdout
    assert _snapshot(directory) == before


def test_a_second_writer_is_refused_in_process_and_across_processes(tmp_path):
    trained, frozen = _halves(_base(), "banded", d=1)
    first = TrainCheckpointer(tmp_path / "a", frozen=frozen)
    with pytest.raises(OSError, match="is being written by another TrainCheckpointer") as info:
        TrainCheckpointer(tmp_path / "a", frozen=frozen)
    assert info.value.errno == errno.EBUSY
    first.close()
    TrainCheckpointer(tmp_path / "a", frozen=frozen).close()  # closed: the next one may write

    holder = _Worker("hold", tmp_path / "b")
    try:
        holder.wait_for("locked")
        with pytest.raises(OSError, match=f"another TrainCheckpointer .*\"pid\": {holder.proc.pid}"):
            TrainCheckpointer(tmp_path / "b", frozen=frozen)
    finally:
        holder.kill()
    TrainCheckpointer(tmp_path / "b", frozen=frozen).close()  # SIGKILL released the lock


@needs_unshare
def test_disk_full_on_a_real_tmpfs_raises_enospc_and_the_same_step_saves_after(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    script = (f"mount -t tmpfs -o size=2m tmpfs {mount} && "
              f"{sys.executable} {WORKER} disk-full {mount}/ckpt")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["refused", "ok"]


# ------------------------------------------------------------------ item 5 of issue 8
@pytest.mark.parametrize("module", ["manager.py", "merged.py", "_files.py"])
def test_checkpoint_modules_use_no_private_orbax_names(module):
    """Orbax's private modules and classes change between releases without notice."""
    source = (ROOT / "svft_jax" / "checkpoint" / module).read_text()
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    orbax_private = sorted(n for n in names if "orbax" in n and "._" in n or n in ("_SignalingThread", "_save_fn", "_src"))
    assert orbax_private == []


def test_baseline_checkpoint_is_refused_by_another_alpha_or_method(tmp_path):
    from svft_jax.baselines import dora, lora

    base = _base()
    trained, frozen = svft_jax.split(lora.apply(base, rank=2, alpha=4.0, targets="layer/kernel"))
    with TrainCheckpointer(tmp_path, frozen=frozen) as ckpt:
        ckpt.save(1, trained)
        other_alpha, _ = svft_jax.split(lora.apply(base, rank=2, alpha=8.0, targets="layer/kernel"))
        assert _shapes(other_alpha) == _shapes(trained)
        with pytest.raises(ValueError, match=r"target 'layer/kernel' differs in \['alpha'\].*alpha: 4.0 in the checkpoint, 8.0"):
            ckpt.restore_latest(other_alpha)
        other_method, _ = svft_jax.split(dora.apply(base, rank=2, alpha=4.0, targets="layer/kernel"))
        with pytest.raises(ValueError, match=r"target 'layer/kernel' differs in \[.*'method'"):
            ckpt.restore_latest(other_method)
        assert np.array_equal(ckpt.restore_latest(trained).trainable["layer"]["kernel"].a, trained["layer"]["kernel"].a)
