"""Merged exports never delete what is not theirs, and clean up only their own leftovers.

Truth: the bytes of every folder or file a user made are compared before and after (sha256
of each file); leftovers are made by a real process that has exited (so its pid is dead).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from svft_jax.checkpoint import (
    load_merged,
    load_merged_safetensors,
    save_adapter,
    save_merged,
    save_merged_safetensors,
)
from svft_jax.checkpoint.merged import MERGED_MARKER, ExportRecoveryWarning


def _params(value: float):
    return {"dense": {"kernel": np.full((4, 3), value, np.float32)}}


def _snapshot(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(path: Path, kind: str, pid: int) -> Path:
    return path.with_name(f".{path.name}.{kind}-{pid}-{uuid.uuid4().hex[:12]}")


def test_overwrite_refuses_a_folder_that_is_not_our_export_and_leaves_it_alone(tmp_path):
    project = tmp_path / "my_project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "train.py").write_text("print('hello')")
    before = _snapshot(project)
    with pytest.raises(ValueError, match="is not a merged export written by svft_jax.checkpoint.save_merged"):
        save_merged(project, _params(1.0), overwrite=True)
    assert _snapshot(project) == before
    # An export without our marker (e.g. a plain Orbax checkpoint) is not provably ours either.
    path = save_merged(tmp_path / "merged", _params(1.0))
    (path / MERGED_MARKER).unlink()
    with pytest.raises(ValueError, match="no svft_jax_merged_export.json"):
        save_merged(path, _params(2.0), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "my_project"]


def test_overwrite_replaces_our_export_and_deletes_only_dead_writers_leftovers(tmp_path):
    path = save_merged(tmp_path / "merged", _params(1.0))
    dead = _dead_pid()
    stale_new, stale_old = _leftover(path, "svft-new", dead), _leftover(path, "svft-old", dead)
    stale_new.with_name(stale_new.name + ".orbax-checkpoint-tmp").mkdir()
    stale_old.mkdir()
    (stale_old / "big").write_bytes(b"x" * 1000)
    live = _leftover(path, "svft-new", os.getpid())  # a live writer's (ours): kept
    live.mkdir()
    users = tmp_path / ".merged.backup"  # a user's own hidden copy: never touched
    users.mkdir()
    save_merged(path, _params(2.0), overwrite=True)
    assert np.all(load_merged(path)["dense"]["kernel"] == 2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", ".merged.backup", live.name])


def test_an_export_moved_aside_by_an_interrupted_swap_is_put_back(tmp_path):
    """Where the file system cannot exchange atomically, a kill between the two renames leaves
    the old export only under its hidden name; the next call restores it before anything else."""
    path = save_merged(tmp_path / "merged", _params(1.0))
    aside = _leftover(path, "svft-old", _dead_pid())
    path.rename(aside)
    with pytest.warns(ExportRecoveryWarning, match="restored it from"), pytest.raises(FileExistsError):
        save_merged(path, _params(2.0))  # overwrite=False: the restored export is kept
    assert np.all(load_merged(path)["dense"]["kernel"] == 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_safetensors_overwrite_replaces_only_our_exports(tmp_path):
    foreign = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"weight": np.ones(3, np.float32)}, str(foreign))
    (tmp_path / "notes.safetensors").write_text("not even safetensors")
    before = {**_snapshot(foreign), **_snapshot(tmp_path / "notes.safetensors")}
    for target in (foreign, tmp_path / "notes.safetensors"):
        with pytest.raises(ValueError, match="is not a merged export written by svft_jax"):
            save_merged_safetensors(target, _params(1.0), overwrite=True)
    assert {**_snapshot(foreign), **_snapshot(tmp_path / "notes.safetensors")} == before
    ours = save_merged_safetensors(tmp_path / "ours.safetensors", _params(1.0))
    dead_tmp = _leftover(ours, "svft-tmp", _dead_pid())
    dead_tmp.write_bytes(b"partial")
    save_merged_safetensors(ours, _params(3.0), overwrite=True)
    assert np.all(load_merged_safetensors(ours)["dense"]["kernel"] == 3.0)
    assert not dead_tmp.exists()


def test_adapter_writes_also_clean_a_killed_writers_temporary_file(tmp_path):
    import jax.numpy as jnp

    import svft_jax

    adapted = svft_jax.apply({"w": {"kernel": jnp.eye(4)}}, "plain", svd_backend="numpy")
    target = tmp_path / "adapter.safetensors"
    dead_tmp = _leftover(target, "svft-tmp", _dead_pid())
    dead_tmp.write_bytes(b"partial")
    save_adapter(target, adapted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


def test_overwrite_without_atomic_exchange_uses_two_renames_and_leaves_nothing(tmp_path, monkeypatch):
    import importlib

    merged_module = importlib.import_module("svft_jax.checkpoint.merged")
    monkeypatch.setattr(merged_module, "exchange_paths", lambda a, b: False)  # e.g. NFS
    path = save_merged(tmp_path / "merged", _params(1.0))
    save_merged(path, _params(2.0), overwrite=True)
    assert np.all(load_merged(path)["dense"]["kernel"] == 2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
