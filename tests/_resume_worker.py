"""A tiny SVFT training run that checkpoints and resumes; killed with SIGKILL by
tests/test_checkpoint_manager.py.

    python tests/_resume_worker.py CKPT_DIR OUT.npz --steps 30 --every 5 --step-seconds 0.05

Resumes from the latest complete checkpoint in CKPT_DIR (if any), trains to --steps, and
writes the final trainable leaves, optimiser-state leaves and RNG key data to OUT.npz.
Everything a step consumes is a function of (restored state, step index), so an
interrupted-and-resumed run must end bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import svft_jax  # noqa: E402
from svft_jax.checkpoint import TrainCheckpointer  # noqa: E402

IN, HIDDEN, OUT, BATCH = 8, 12, 4, 16


def base_params():
    """A two-layer MLP; fixed numbers so every process builds the same base model."""
    g = np.random.default_rng(1234)
    return {
        "dense1": {"kernel": jnp.asarray(g.normal(size=(IN, HIDDEN)), jnp.float32), "bias": jnp.zeros(HIDDEN)},
        "dense2": {"kernel": jnp.asarray(g.normal(size=(HIDDEN, OUT)), jnp.float32), "bias": jnp.zeros(OUT)},
    }


def batch_at(step: int):
    """The data stream, indexed by step (so the data position is just the step)."""
    g = np.random.default_rng(10_000 + step)
    x = g.normal(size=(BATCH, IN)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(np.tanh(x @ np.ones((IN, OUT), np.float32) * 0.3))


def setup():
    adapted = svft_jax.apply(base_params(), pattern="banded", d=1, svd_backend="numpy")
    trainable, frozen = svft_jax.split(adapted)
    tx = svft_jax.optimizer(optax.adam(1e-2))
    return trainable, frozen, tx, tx.init(trainable)


def make_step(frozen, tx):
    def loss_fn(trainable, x, y, key):
        params = svft_jax.merge(svft_jax.combine(trainable, frozen))
        noisy = x + 0.01 * jax.random.normal(key, x.shape)  # consumes the RNG every step
        h = jnp.tanh(noisy @ params["dense1"]["kernel"] + params["dense1"]["bias"])
        return jnp.mean((h @ params["dense2"]["kernel"] + params["dense2"]["bias"] - y) ** 2)

    @jax.jit
    def step(trainable, opt_state, rng, x, y):
        rng, key = jax.random.split(rng)
        loss, grads = jax.value_and_grad(loss_fn)(trainable, x, y, key)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, rng, loss

    return step


def run(directory, total_steps: int, every: int, step_seconds: float = 0.0):
    """Train steps 1..total_steps, resuming from `directory`; returns (trainable, opt_state, rng)."""
    trainable, frozen, tx, opt_state = setup()
    rng = jax.random.key(0)
    step_fn = make_step(frozen, tx)
    ckpt = TrainCheckpointer(directory, max_to_keep=2, best_metric="loss", best_mode="min", frozen=frozen)
    start = 1
    restored = ckpt.restore_latest(trainable, opt_state)
    if restored is not None:
        trainable, opt_state, rng = restored.trainable, restored.opt_state, restored.rng
        start = restored.data_position["next_step"]
    for step in range(start, total_steps + 1):
        x, y = batch_at(step)
        trainable, opt_state, rng, loss = step_fn(trainable, opt_state, rng, x, y)
        if step % every == 0:
            ckpt.save(step, trainable, opt_state, {"loss": loss}, rng=rng, data_position={"next_step": step + 1})
            print(f"saved {step}", flush=True)
        if ckpt.latest_step() is not None:  # slow only once a checkpoint exists: room for a kill
            time.sleep(step_seconds)
    ckpt.close()
    return trainable, opt_state, rng


def flat_state(trainable, opt_state, rng) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves((trainable, opt_state))
    return {**{f"leaf{i}": np.asarray(x) for i, x in enumerate(leaves)}, "rng": np.asarray(jax.random.key_data(rng))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    args = parser.parse_args(argv)
    state = run(args.directory, args.steps, args.every, args.step_seconds)
    np.savez(args.out, **flat_state(*state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
