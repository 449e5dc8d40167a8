"""Faults: foreign folders/files, truncation, corruption, mismatches, unwritable paths, disk
full. Each gives a clear error and leaves earlier checkpoints and adapters byte-identical."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib
import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

import svft_jax
from svft_jax.checkpoint import (
    TrainCheckpointer,
    load_adapter,
    read_adapter,
    save_adapter,
    save_merged,
    save_merged_safetensors,
)

files_module = importlib.import_module("svft_jax.checkpoint._files")
records_module = importlib.import_module("svft_jax.checkpoint._records")
manager_module = importlib.import_module("svft_jax.checkpoint.manager")


def _base(seed: int = 0, query_shape=(8, 8)):
    g = np.random.default_rng(seed)
    return {"query": {"kernel": jnp.asarray(g.normal(size=query_shape), jnp.float32)},
            "value": {"kernel": jnp.asarray(g.normal(size=(8, 8)), jnp.float32)}}


def _trained(base, pattern="banded", **kwargs):
    adapted = svft_jax.apply(base, pattern, svd_backend="numpy", **kwargs)
    g = np.random.default_rng(1)
    return jax.tree_util.tree_map(
        lambda x: dataclasses.replace(x, m=jnp.asarray(g.normal(size=x.m.shape), jnp.float32)) if svft_jax.is_node(x) else x,
        adapted, is_leaf=svft_jax.is_node)


def _snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _adapter(tmp_path, name="a.safetensors", base=None):
    base = _base() if base is None else base
    return save_adapter(tmp_path / name, _trained(base, d=1)), base


def _train_state():
    adapted = svft_jax.apply(_base(), "banded", d=1, svd_backend="numpy")
    trainable, _ = svft_jax.split(adapted)
    tx = svft_jax.optimizer(optax.adam(1e-2))
    return trainable, tx.init(trainable)


# ------------------------------------------------------------------ not ours
def test_folder_with_foreign_files_is_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("my experiment log")
    (tmp_path / "7").mkdir()
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="not empty and was not created by svft_jax TrainCheckpointer"):
        TrainCheckpointer(tmp_path)
    assert _snapshot(tmp_path) == before


def test_step_written_by_someone_else_is_refused(tmp_path):
    trainable, opt_state = _train_state()
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, trainable, opt_state)
    meta_file = tmp_path / "1" / "meta" / "metadata"
    meta_file.write_text(json.dumps({"format": "someone-elses-trainer", "step": 1}))
    with pytest.raises(ValueError, match="not written by svft_jax TrainCheckpointer"):
        TrainCheckpointer(tmp_path).restore(1, trainable, opt_state)


def test_foreign_or_newer_adapter_files_are_refused(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign.safetensors"
    safetensors.numpy.save_file({"weight": np.ones(3, np.float32)}, str(foreign))
    with pytest.raises(ValueError, match="is not an svft-jax svft-jax-adapter"):
        load_adapter(foreign, _base())
    monkeypatch.setattr(records_module, "FORMAT_VERSION", 99)
    newer, base = _adapter(tmp_path, "newer.safetensors")
    monkeypatch.setattr(records_module, "FORMAT_VERSION", 1)
    with pytest.raises(ValueError, match="format version 99; this svft-jax reads version 1"):
        load_adapter(newer, base)


# ------------------------------------------------------------------ truncated / corrupted
@pytest.mark.parametrize("keep_fraction", [0.0, 0.3, 0.97])
def test_truncated_adapter_is_refused(tmp_path, keep_fraction):
    path, base = _adapter(tmp_path)
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * keep_fraction)])
    with pytest.raises(ValueError, match="truncated"):
        load_adapter(path, base)


def test_flipped_byte_in_adapter_data_fails_the_checksum(tmp_path):
    path, base = _adapter(tmp_path)
    blob = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", blob[:8])
    blob[8 + header_len + 5] ^= 0x40  # inside the first tensor's data
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum does not match"):
        load_adapter(path, base)


# Orbax/tensorstore finish a failed read's callbacks after its event loop closed (harmless noise).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_training_checkpoint_is_refused_and_earlier_step_still_restores(tmp_path):
    trainable, opt_state = _train_state()
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, trainable, opt_state)
        ckpt.save(2, jax.tree_util.tree_map(lambda x: x + 1, trainable), opt_state)
    step1 = _snapshot(tmp_path / "1")
    data_files = [p for p in (tmp_path / "2" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for p in data_files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    ckpt = TrainCheckpointer(tmp_path)
    with pytest.raises(ValueError, match="checkpoint step 2 .* is damaged"):
        ckpt.restore_latest(trainable, opt_state)
    restored = ckpt.restore(1, trainable, opt_state)
    for a, b in zip(jax.tree_util.tree_leaves(restored.trainable), jax.tree_util.tree_leaves(trainable), strict=True):
        assert np.array_equal(a, b)
    assert _snapshot(tmp_path / "1") == step1


# ------------------------------------------------------------------ mismatches
def test_template_with_other_pattern_is_refused_by_name(tmp_path):
    trainable, opt_state = _train_state()
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, trainable, opt_state)
    other, _ = svft_jax.split(svft_jax.apply(_base(), "banded", d=2, svd_backend="numpy"))
    with pytest.raises(ValueError, match=r"target 'query/kernel' differs in \['d', 'num_entries', 'omega_sha256'\].*d: 1 in the checkpoint, 2 in the template"):
        TrainCheckpointer(tmp_path).restore_latest(other)
    fewer, _ = svft_jax.split(svft_jax.apply(_base(), "banded", d=1, targets="query/kernel", svd_backend="numpy"))
    with pytest.raises(ValueError, match=r"other adapter targets \(only in the checkpoint: \['value/kernel'\]"):
        TrainCheckpointer(tmp_path).restore_latest(fewer)


def test_adapter_on_base_with_other_shapes_or_weights_is_refused(tmp_path):
    path, _ = _adapter(tmp_path)
    with pytest.raises(ValueError, match=r"does not fit this base model: 'query/kernel' is \(8, 6\) float32 here but \(8, 8\)"):
        load_adapter(path, _base(0, query_shape=(8, 6)))
    with pytest.raises(ValueError, match="trained on a different base model: the weights of 'query/kernel' differ"):
        load_adapter(path, _base(seed=5))
    renamed = {"q": _base()["query"], "value": _base()["value"]}
    with pytest.raises(ValueError, match="parameter 'query/kernel', which these base_params do not have"):
        load_adapter(path, renamed)


# ------------------------------------------------------------------ unwritable destinations
def test_destination_under_a_regular_file_fails_for_every_user_including_root(tmp_path):
    """A parent that is a file gives ENOTDIR even for root (permission bits would not)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    adapted = _trained(_base(), d=1)
    with pytest.raises(ValueError, match="is a file, not a directory"):
        save_adapter(blocker / "a.safetensors", adapted)
    with pytest.raises(ValueError, match="is a file, not a directory"):
        save_merged_safetensors(blocker / "deeper" / "m.safetensors", adapted)
    with pytest.raises(ValueError, match="is a file, not a directory"):
        save_merged(blocker / "merged", adapted)
    with pytest.raises(ValueError, match="is a file, not a directory"):
        TrainCheckpointer(blocker / "ckpt")
    assert blocker.read_text() == "a file, not a folder"


# ------------------------------------------------------------------ disk full
def test_disk_full_while_overwriting_an_adapter_keeps_the_old_bytes(tmp_path, monkeypatch):
    path, base = _adapter(tmp_path)
    before = path.read_bytes()
    calls = []

    def full_disk(file, chunk):
        calls.append(len(chunk))
        if len(calls) == 2:  # the header went out, the data does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        file.write(chunk)

    monkeypatch.setattr(files_module, "_write_chunk", full_disk)
    with pytest.raises(OSError, match="the disk is full; the existing file is unchanged") as info:
        save_adapter(path, _trained(base, d=1), overwrite=True)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # temp file removed
    monkeypatch.undo()
    assert read_adapter(path).targets  # still a valid, checksummed adapter


def test_disk_full_during_a_training_save_keeps_earlier_steps_and_resumes_from_them(tmp_path, monkeypatch):
    trainable, opt_state = _train_state()
    ckpt = TrainCheckpointer(tmp_path)
    ckpt.save(1, trainable, opt_state, data_position=100)
    earlier = _snapshot(tmp_path / "1")

    def full_disk(manager, step, args, metrics, force):
        # A step half written into Orbax's tmp folder, then the error Orbax raises when
        # tensorstore hits ENOSPC (its text as seen on a full tmpfs; see test_checkpoint_disk).
        partial = manager.directory / f"{step}.orbax-checkpoint-tmp" / "state"
        partial.mkdir(parents=True)
        (partial / "chunk").write_bytes(b"half")
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"manifest.ocdbt\": Failed to write 166 bytes: No space left on device [os_error_code='28']")

    monkeypatch.setattr(manager_module, "_orbax_save", full_disk)
    with pytest.raises(OSError, match="could not save checkpoint step 2 .* Earlier steps are untouched") as info:
        ckpt.save(2, jax.tree_util.tree_map(lambda x: x + 1, trainable), opt_state, data_position=200)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert ckpt.all_steps() == [1]
    assert _snapshot(tmp_path / "1") == earlier
    ckpt.save(2, trainable, opt_state, data_position=200)  # space is back: the same step saves
    ckpt.close()
    assert sorted(p.name for p in tmp_path.glob("2*")) == ["2"]  # the partial tmp folder is gone
    reopened = TrainCheckpointer(tmp_path)
    assert reopened.all_steps() == [1, 2]
    assert reopened.restore(1, trainable, opt_state).data_position == 100
    assert reopened.restore_latest(trainable, opt_state).data_position == 200
    assert _snapshot(tmp_path / "1") == earlier
