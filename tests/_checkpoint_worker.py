"""Subprocess worker for the checkpoint fault tests (SIGKILL loops, locks, mounts).

    python tests/_checkpoint_worker.py MODE PATH [N]

Modes:
  save-loop DIR        save steps 1, 2, ... forever with max_to_keep=1 and a best metric
                       (every save also deletes a step: retention), printing "saved N"
  hold DIR             open DIR for writing, print "locked", sleep until killed
  restore DIR          open DIR read-only, restore the latest step, print "restored N"
  disk-full DIR        save until the disk is full; expect OSError(ENOSPC); free the filler
                       file; save the same step again; print "ok" (run inside a small tmpfs)
  export-loop PATH     save_merged(PATH, params filled with i, overwrite=True) for i = N, N+1, ...
  safetensors-loop PATH  the same with save_merged_safetensors

Every saved value is a function of the step (or i), so a test can check that whatever it
finds after a kill is one complete version.
"""

from __future__ import annotations

import errno
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import svft_jax  # noqa: E402
from svft_jax.checkpoint import TrainCheckpointer, save_merged, save_merged_safetensors  # noqa: E402


def train_state():
    """A small adapted model (fixed numbers: every process builds the same one)."""
    g = np.random.default_rng(7)
    base = {"layer": {"kernel": jnp.asarray(g.normal(size=(6, 5)), jnp.float32)}}
    adapted = svft_jax.apply(base, "banded", d=1, svd_backend="numpy")
    trainable, frozen = svft_jax.split(adapted)
    return trainable, frozen, optax.adam(1e-2)


def at_step(trainable, step: int):
    """The trainable half with every M entry equal to `step`."""
    return jax.tree_util.tree_map(lambda x: jnp.full_like(x, float(step)), trainable)


def export_params(i: int, size: int = 64):
    return {"dense": {"kernel": np.full((size, size), float(i), np.float32), "bias": np.full((size,), float(i), np.float32)}}


def main(mode: str, path: str, start: int = 0) -> int:
    if mode in ("export-loop", "safetensors-loop"):
        write = save_merged if mode == "export-loop" else save_merged_safetensors
        print("ready", flush=True)
        for i in range(start, start + 10_000):
            print(f"start {i}", flush=True)
            write(path, export_params(i), overwrite=True)
            print(f"done {i}", flush=True)
        return 0
    trainable, frozen, tx = train_state()
    opt_state = tx.init(trainable)
    if mode == "hold":
        with TrainCheckpointer(path, frozen=frozen):
            print("locked", flush=True)
            time.sleep(600)
        return 0
    if mode == "restore":
        restored = TrainCheckpointer(path, read_only=True, frozen=frozen).restore_latest(trainable, opt_state)
        assert all(np.all(np.asarray(x) == restored.step) for x in jax.tree_util.tree_leaves(restored.trainable))
        print(f"restored {restored.step}", flush=True)
        return 0
    if mode == "save-loop":
        with TrainCheckpointer(path, max_to_keep=1, best_metric="loss", best_mode="min", frozen=frozen) as ckpt:
            step = (ckpt.latest_step() or 0) + 1
            print("ready", flush=True)
            while True:
                # The loss rises, so the best step (the oldest) and the latest are both kept
                # and every save deletes the previous latest: retention on every step.
                ckpt.save(step, at_step(trainable, step), opt_state, {"loss": float(step)}, data_position=step)
                print(f"saved {step}", flush=True)
                step += 1
    if mode == "disk-full":
        filler = os.path.join(os.path.dirname(path), "filler")
        with TrainCheckpointer(path, max_to_keep=None, frozen=frozen) as ckpt:
            ckpt.save(1, at_step(trainable, 1), opt_state)
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:  # fill the disk to the last byte
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
            finally:
                os.close(fd)
            try:
                ckpt.save(2, at_step(trainable, 2), opt_state)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
                assert "the disk is full" in str(err), err
                print("refused", flush=True)
            else:
                raise AssertionError("saving onto a full disk did not raise")
            assert ckpt.all_steps() == [1], ckpt.all_steps()
            os.remove(filler)
            ckpt.save(2, at_step(trainable, 2), opt_state)  # space is back: the same step saves
        with TrainCheckpointer(path, frozen=frozen) as ckpt:
            assert ckpt.all_steps() == [1, 2], ckpt.all_steps()
            for step in (1, 2):
                restored = ckpt.restore(step, trainable, opt_state)
                assert all(np.all(np.asarray(x) == step) for x in jax.tree_util.tree_leaves(restored.trainable))
        print("ok", flush=True)
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:])))
