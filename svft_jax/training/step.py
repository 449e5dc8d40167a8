"""Jitted train and eval steps over the (trainable, frozen) halves of an adapted tree.

    train_step = make_train_step(loss_fn, tx, accumulation_steps=4)
    trainable, opt_state, metrics = train_step(trainable, frozen, opt_state, batch, rng)

Only `trainable` (SVFT's M, gates and `extra` leaves, from `svft_jax.split`) is
differentiated; U, s, V and W0 stay in `frozen`, are never differentiated and get no optimiser
state. The same step function runs single-device, under `jit` with sharded inputs (XLA inserts
the gradient all-reduce) and under `pmap` (`axis_name` adds an explicit `pmean`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from svft_jax.transform import combine

_DONATABLE = {"trainable": 0, "opt_state": 2}


def _check_accumulation(accumulation_steps) -> int:
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}.")
    return accumulation_steps


def split_micro_batches(batch, accumulation_steps: int):
    """(B, ...) leaves -> (n, B/n, ...): micro-batch i holds examples i, i + n, i + 2n, ...

    The strided split (not contiguous blocks) keeps every micro-batch spread evenly over the
    devices when the batch axis is sharded in contiguous blocks, so no data moves between
    devices; the mean over micro-batches of per-micro-batch means equals the full-batch mean
    for losses that average over examples.

    Raises:
      ValueError: if a leaf's leading axis is not divisible by `accumulation_steps`.
    """
    n = accumulation_steps

    def split(path, x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % n:
            name = jax.tree_util.keystr(path) or "batch"
            raise ValueError(f"batch leaf {name} has shape {x.shape}; its leading (batch) axis must be divisible by accumulation_steps={n}.")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree_util.tree_map_with_path(split, batch)


def _as_loss_and_metrics(output):
    if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict)):
        raise TypeError(
            "loss_fn must return (scalar loss, dict of scalar metrics), e.g. `return loss, {}`; "
            f"got {type(output).__name__}."
        )
    loss, metrics = output
    if jnp.ndim(loss) != 0:
        raise ValueError(f"loss_fn must return a scalar loss, got shape {jnp.shape(loss)}; average over the batch.")
    return jnp.asarray(loss, jnp.float32), {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}


def train_step_fn(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    accumulation_steps: int = 1,
    axis_name: str | None = None,
) -> Callable:
    """The un-jitted train step (for `jit`, `pmap` or `shard_map` by the caller).

    Args:
      loss_fn: loss_fn(adapted, batch, rng) -> (scalar loss, {name: scalar}); `adapted` is
        `svft_jax.combine(trainable, frozen)`.
      tx: optimiser over the trainable half (e.g. `svft_jax.optimizer(optax.adamw(lr), adapted)`).
      accumulation_steps: n > 1 splits the batch's leading axis into n micro-batches (see
        `split_micro_batches`), scans over them and averages gradients and metrics; micro-batch
        i gets `jax.random.fold_in(rng, i)`.
      axis_name: when set (under `pmap`), gradients and metrics are `pmean`-ed over it.
    Returns:
      step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, metrics), with
      metrics {"loss", "grad_norm", *loss_fn metrics} as float32 scalars.
    """
    n = _check_accumulation(accumulation_steps)

    def loss_and_grads(trainable, frozen, batch, rng):
        def objective(params):
            return _as_loss_and_metrics(loss_fn(combine(params, frozen), batch, rng))

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        return grads, {**metrics, "loss": loss}

    def accumulated(trainable, frozen, batch, rng):
        micro_batches = split_micro_batches(batch, n)
        first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
        shapes = jax.eval_shape(loss_and_grads, trainable, frozen, first, rng)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(total, inputs):
            index, micro_batch = inputs
            result = loss_and_grads(trainable, frozen, micro_batch, jax.random.fold_in(rng, index))
            return jax.tree_util.tree_map(jnp.add, total, result), None

        total, _ = jax.lax.scan(body, zeros, (jnp.arange(n), micro_batches))
        return jax.tree_util.tree_map(lambda x: x / n, total)

    def step(trainable, frozen, opt_state, batch, rng):
        if not jax.tree_util.tree_leaves(trainable):
            raise ValueError("train_step: `trainable` has no arrays; pass the first half of svft_jax.split(adapted, extra=...) of an adapted tree.")
        if n == 1:
            grads, metrics = loss_and_grads(trainable, frozen, batch, rng)
        else:
            grads, metrics = accumulated(trainable, frozen, batch, rng)
        if axis_name is not None:
            grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {**metrics, "grad_norm": optax.tree.norm(grads)}

    return step


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    accumulation_steps: int = 1,
    donate: tuple[str, ...] = ("opt_state",),
) -> Callable:
    """A jit-compiled SVFT train step.

    Args:
      loss_fn: loss_fn(adapted, batch, rng) -> (scalar loss, {name: scalar}). It decides how
        the model runs, e.g. `model(**inputs, params=svft_jax.merge(adapted))`.
      tx: optimiser for the trainable half; `svft_jax.optimizer(...)` (separate head LR via
        `extra_tx`).
      accumulation_steps: micro-batches per step (lax.scan); gradients are averaged.
      donate: which inputs' buffers the step may reuse for its outputs: any of "opt_state"
        (default: the optimiser state is only ever consumed by the next step) and "trainable"
        (saves a copy of M, but the arrays passed in — which `split` shares with the
        `adapted` tree — are deleted after the call).
    Returns:
      train_step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, metrics);
      metrics hold "loss", "grad_norm" and loss_fn's metrics (float32 scalars, averaged over
      micro-batches). With sharded inputs (`svft_jax.distributed.shard_batch`) the same step
      runs data-parallel.
    """
    unknown = set(donate) - set(_DONATABLE)
    if isinstance(donate, str) or unknown:
        raise ValueError(f"donate must be a tuple of names from {sorted(_DONATABLE)}, got {donate!r}.")
    step = train_step_fn(loss_fn, tx, accumulation_steps=accumulation_steps)
    return jax.jit(step, donate_argnums=tuple(sorted(_DONATABLE[name] for name in donate)))


def make_eval_step(metric_fn: Callable) -> Callable:
    """A jit-compiled evaluation step.

    Args:
      metric_fn: metric_fn(adapted, batch) -> {name: array} (scalars, or per-example arrays
        that the caller aggregates, e.g. predictions for MCC / Pearson).
    Returns:
      eval_step(trainable, frozen, batch) -> dict, with `adapted = combine(trainable, frozen)`.
    """

    def step(trainable, frozen, batch):
        metrics = metric_fn(combine(trainable, frozen), batch)
        if not isinstance(metrics, dict):
            raise TypeError(f"metric_fn must return a dict of metrics, got {type(metrics).__name__}.")
        return metrics

    return jax.jit(step)
