"""SIGKILL loops: a worker process saves over and over and is killed at random moments.

Truth checked after every kill (not a sample at the end):
  * merged exports (`save_merged`, `save_merged_safetensors`, overwrite=True): a complete
    export — every value equal to one version i that the worker had started, and not older
    than the last one it reported done — is at the path; hidden leftovers of ours number at
    most what one interrupted call can leave, so they never accumulate; one more call leaves
    none.
  * training checkpoints (save + retention every step): re-opening the folder for writing
    succeeds (the killed writer's lock is gone), leaves only complete steps (no Orbax tmp,
    incomplete or trash folders), keeps every step the worker reported saved as the latest,
    and restores it exactly.
The quick variants (2 kills each) run by default; `-m slow` runs 20 kills each and prints
the tally.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import _checkpoint_worker as worker
import jax
import numpy as np
import pytest

from svft_jax.checkpoint import (
    TrainCheckpointer,
    load_merged,
    load_merged_safetensors,
    save_merged,
    save_merged_safetensors,
)

WORKER = Path(__file__).with_name("_checkpoint_worker.py")
ROOT = Path(__file__).resolve().parents[1]


class _Worker:
    """A worker subprocess whose stdout lines arrive on a queue (so waits can time out)."""

    def __init__(self, *args):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            assert line is not None, f"worker exited (rc={self.proc.wait()}) before printing {prefix!r}; saw {self.seen[-3:]}"
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def kill(self) -> list[str]:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)  # reaped: its pid is gone, so its leftovers count as dead
        while (line := self.lines.get(timeout=30)) is not None:
            self.seen.append(line)
        assert self.proc.returncode == -signal.SIGKILL
        return self.seen


def _last_number(lines: list[str], word: str, default: int) -> int:
    values = [int(line.split()[1]) for line in lines if line.startswith(word + " ")]
    return values[-1] if values else default


def _hidden_leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _export_kill_loop(tmp_path, kind: str, kills: int, seed: int = 0) -> Counter:
    path = tmp_path / ("merged" if kind == "export-loop" else "model.safetensors")
    write = save_merged if kind == "export-loop" else save_merged_safetensors
    load = load_merged if kind == "export-loop" else load_merged_safetensors
    write(path, worker.export_params(0))
    rng, tally, next_i, known_done = random.Random(seed), Counter(), 1, 0
    # One interrupted call can leave its staging copy (with Orbax's tmp folder inside the
    # name) or, after the swap, the old export: never more than 2 names, and never growing.
    limit = 2 if kind == "export-loop" else 1
    start = time.monotonic()
    for _ in range(kills):
        proc = _Worker(kind, path, next_i)
        proc.wait_for("start")
        time.sleep(rng.uniform(0.0, 1.5))
        lines = proc.kill()
        started = _last_number(lines, "start", next_i - 1)
        done = known_done = _last_number(lines, "done", known_done)
        leftovers = _hidden_leftovers(path)
        assert len(leftovers) <= limit, leftovers
        values = {float(np.unique(np.asarray(x)).item()) for x in jax.tree_util.tree_leaves(load(path))}
        assert len(values) == 1, f"mixed versions {values} at {path}"
        (found,) = values
        assert done <= found <= started, (found, done, started)
        if kind == "export-loop":
            assert (path / "svft_jax_merged_export.json").is_file()
        tally["mid-write (new export not yet in place)" if found < started else "after the swap or between calls"] += 1
        tally[f"leftovers after the kill: {len(leftovers)}"] += 1
        next_i = started + 1
    write(path, worker.export_params(next_i), overwrite=True)
    assert _hidden_leftovers(path) == []
    tally["seconds"] = round(time.monotonic() - start)
    return tally


def _checkpoint_kill_loop(tmp_path, kills: int, seed: int = 0) -> Counter:
    directory = tmp_path / "ckpt"
    trainable, frozen, tx = worker.train_state()
    opt_state = tx.init(trainable)
    rng, tally, reported = random.Random(seed), Counter(), 0
    start = time.monotonic()
    for _ in range(kills):
        proc = _Worker("save-loop", directory)
        proc.wait_for("ready")
        time.sleep(rng.uniform(0.0, 1.5))
        lines = proc.kill()
        reported = _last_number(lines, "saved", reported)
        names = {p.name for p in directory.iterdir()}
        left = sorted(n for n in names if not n.isdigit() and not n.startswith(("svft_jax_checkpoints", ".svft_jax", "_")))
        trash = directory / ".svft_jax_deleted"
        left += [f"trash/{p.name}" for p in trash.iterdir()] if trash.is_dir() else []
        for name in left or ["none"]:  # what the kill left, by kind
            kind = "orbax tmp" if ".orbax-checkpoint-tmp" in name else "trash" if name.startswith("trash/") else name
            tally[f"left by the kill: {kind}"] += 1
        with TrainCheckpointer(directory, max_to_keep=1, best_metric="loss", best_mode="min", frozen=frozen) as ckpt:
            steps = ckpt.all_steps()
            on_disk = sorted(p.name for p in directory.iterdir() if not p.name.startswith(("svft_jax_checkpoints", ".svft_jax_writer", "_")))
            assert on_disk == sorted([str(s) for s in steps] + ([".svft_jax_deleted"] if trash.is_dir() else [])), on_disk
            assert not trash.is_dir() or not any(trash.iterdir())
            # Best (step 1) + latest, plus the previous latest when the kill landed between a
            # commit and its retention (the next save deletes it).
            assert 1 <= len(steps) <= 3 and steps[0] == 1, steps
            if len(steps) == 3:
                tally["killed between a commit and its retention"] += 1
            assert ckpt.latest_step() >= reported, (steps, reported)
            restored = ckpt.restore_latest(trainable, opt_state)
            assert all(np.all(np.asarray(x) == restored.step) for x in jax.tree_util.tree_leaves(restored.trainable))
            assert restored.data_position == restored.step
            tally["latest = last reported" if ckpt.latest_step() == reported else "latest committed, not yet reported"] += 1
        tally["kills"] += 1
    tally["steps saved in all"] = reported
    tally["seconds"] = round(time.monotonic() - start)
    return tally


@pytest.mark.slow  # subprocess kill loops; the 20-kill versions below are the ones reported
@pytest.mark.parametrize("kind", ["export-loop", "safetensors-loop"])
def test_sigkill_during_overwrite_leaves_a_complete_export_and_no_pile_of_leftovers(tmp_path, kind):
    _export_kill_loop(tmp_path, kind, kills=2)


@pytest.mark.slow
def test_sigkill_during_save_and_retention_leaves_a_clean_restorable_directory(tmp_path):
    _checkpoint_kill_loop(tmp_path, kills=2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["export-loop", "safetensors-loop"])
def test_twenty_sigkills_during_export_overwrites(tmp_path, kind, capsys):
    tally = _export_kill_loop(tmp_path, kind, kills=20, seed=20)
    with capsys.disabled():
        print(f"\n{kind}: 20 kills: {dict(tally)}")


@pytest.mark.slow
def test_twenty_sigkills_during_checkpoint_saves_and_retention(tmp_path, capsys):
    tally = _checkpoint_kill_loop(tmp_path, kills=20, seed=20)
    with capsys.disabled():
        print(f"\ntrain checkpoints: 20 kills: {dict(tally)}")
