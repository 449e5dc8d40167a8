"""Jitted train and eval steps over the (trainable, frozen) halves of an adapted tree.

    train_step = make_train_step(loss_fn, tx, accumulation_steps=4)
    trainable, opt_state, metrics = train_step(trainable, frozen, opt_state, batch, rng)

Only `trainable` (SVFT's M, gates and `extra` leaves, from `svft_jax.split`) is
differentiated; U, s, V and W0 stay in `frozen`, are never differentiated and get no optimiser
state. The same step function runs single-device, under `jit` with sharded inputs (XLA inserts
the gradient all-reduce) and under `pmap` (`axis_name` adds an explicit reduction).

Accumulation keeps the objective. A loss that averages over a varying number of units (target
tokens under a padding mask, weighted examples) is not the mean of its micro-batch means: the
full batch's loss is Σᵢ countᵢ·lossᵢ / Σᵢ countᵢ. The built-in losses return that count
(`LossOutput.count`), a user-written `loss_fn` returns `(loss, metrics, count)`, and the step
weights micro-batches (and `pmap` devices) by it, so n micro-batches give the full batch's
gradient and metrics up to float rounding.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from svft_jax.core import combine
from svft_jax.errors import AccumulationWeightingWarning
from svft_jax.training.losses import LossOutput

_DONATABLE = {"trainable": 0, "opt_state": 2}
_ARG_NAMES = ("trainable", "frozen", "opt_state", "batch", "rng")


def _check_accumulation(accumulation_steps) -> int:
    if (
        isinstance(accumulation_steps, bool)
        or not isinstance(accumulation_steps, int)
        or accumulation_steps < 1
    ):
        raise ValueError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}.")
    return accumulation_steps


def split_micro_batches(batch, accumulation_steps: int):
    """(B, ...) leaves -> (n, B/n, ...): micro-batch i holds examples i, i + n, i + 2n, ...

    The strided split (not contiguous blocks) keeps every micro-batch spread evenly over the
    devices when the batch axis is sharded in contiguous blocks, so no data moves between
    devices. Micro-batches then carry different numbers of targets when a mask is present;
    the train step weights them by the loss's count (see `make_train_step`).

    Raises:
      ValueError: if a leaf's leading axis is not divisible by `accumulation_steps`.
    """
    n = _check_accumulation(accumulation_steps)

    def split(path, x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % n:
            name = jax.tree_util.keystr(path) or "batch"
            raise ValueError(
                f"batch leaf {name} has shape {x.shape}; its leading (batch) axis must be divisible by accumulation_steps={n}."
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree_util.tree_map_with_path(split, batch)


def _loss_metrics_count(output):
    """(loss, metrics, count or None) from what a loss_fn returned, checked."""
    if isinstance(output, LossOutput):
        loss, metrics, count = output[0], output[1], output.count
    elif isinstance(output, tuple) and len(output) == 3 and isinstance(output[1], dict):
        loss, metrics, count = output
    elif isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict):
        (loss, metrics), count = output, None
    else:
        raise TypeError(
            "loss_fn must return (scalar loss, dict of scalar metrics) or (loss, metrics, count), "
            f"e.g. `return loss, {{}}`; got {type(output).__name__}."
        )
    if jnp.ndim(loss) != 0:
        raise ValueError(
            f"loss_fn must return a scalar loss, got shape {jnp.shape(loss)}; average over the batch."
        )
    if count is not None:
        if jnp.ndim(count) != 0:
            raise ValueError(
                f"loss_fn's count must be a scalar (the number or total weight of examples/tokens "
                f"the loss averages over), got shape {jnp.shape(count)}."
            )
        count = jax.lax.stop_gradient(jnp.asarray(count, jnp.float32))
    metrics = {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}
    return jnp.asarray(loss, jnp.float32), metrics, count


def _accumulator_dtype(dtype):
    # Sum low-precision gradients in float32: n bfloat16 additions would lose the small ones.
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


def train_step_fn(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    accumulation_steps: int = 1,
    axis_name: str | None = None,
) -> Callable:
    """The un-jitted train step (for `jit`, `pmap` or `shard_map` by the caller).

    Args:
      loss_fn: loss_fn(adapted, batch, rng) -> (scalar loss, {name: scalar}) or
        (loss, metrics, count); `adapted` is `svft_jax.combine(trainable, frozen)`. `count` is
        the number (total weight) of examples or tokens `loss` averages over; the built-in
        losses return a `LossOutput` that carries it.
      tx: optimiser over the trainable half (e.g. `svft_jax.optimizer(optax.adamw(lr), adapted)`).
      accumulation_steps: n > 1 splits the batch's leading axis into n micro-batches (see
        `split_micro_batches`) and scans over them; micro-batch i gets
        `jax.random.fold_in(rng, i)`. Gradients and metrics are averaged with weights countᵢ
        (Σ countᵢ·gᵢ / Σ countᵢ), which is the full batch's gradient; without a count, with
        equal weights and an `AccumulationWeightingWarning`.
      axis_name: when set (under `pmap`), the same weighted average runs over the devices
        (a `psum` of count-weighted sums and of counts; a `pmean` when there is no count).
    Returns:
      step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, metrics), with
      metrics {"loss", "grad_norm", *loss_fn metrics} as float32 scalars.
    """
    n = _check_accumulation(accumulation_steps)
    warned = []  # warn once per step function, not at every trace of the scan body

    def loss_and_grads(trainable, frozen, batch, rng):
        def objective(params):
            loss, metrics, count = _loss_metrics_count(loss_fn(combine(params, frozen), batch, rng))
            return loss, (metrics, count)

        (loss, (metrics, count)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        return grads, {**metrics, "loss": loss}, count

    def weighted_sums(trainable, frozen, batch, rng):
        """(Σ c·g, Σ c·metrics, Σ c) over the micro-batches (c = 1 without a count)."""

        def one(micro_batch, micro_rng):
            grads, metrics, count = loss_and_grads(trainable, frozen, micro_batch, micro_rng)
            if count is None:
                if (n > 1 or axis_name is not None) and not warned:
                    warned.append(True)
                    parts = " and ".join(
                        name
                        for name, present in (("micro-batches", n > 1), ("devices", axis_name))
                        if present
                    )
                    warnings.warn(
                        f"loss_fn returned (loss, metrics) without a count, so the {parts} are "
                        "weighted equally: that equals the full batch's objective only if each "
                        "averages over the same number of examples/tokens. Return (loss, "
                        "metrics, count), count = the number (total weight) of examples or "
                        "tokens the loss averages over (the built-in losses' LossOutput "
                        "carries it), to weight them exactly.",
                        AccumulationWeightingWarning,
                        stacklevel=2,
                    )
                count = jnp.ones((), jnp.float32)

            def scale(x):
                return x.astype(_accumulator_dtype(x.dtype)) * count.astype(
                    _accumulator_dtype(x.dtype)
                )

            return (
                jax.tree_util.tree_map(scale, grads),
                jax.tree_util.tree_map(scale, metrics),
                count,
            )

        if n == 1:
            return one(batch, rng)
        micro_batches = split_micro_batches(batch, n)
        first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
        shapes = jax.eval_shape(one, first, rng)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(total, inputs):
            index, micro_batch = inputs
            result = one(micro_batch, jax.random.fold_in(rng, index))
            return jax.tree_util.tree_map(jnp.add, total, result), None

        total, _ = jax.lax.scan(body, zeros, (jnp.arange(n), micro_batches))
        return total

    def averaged(trainable, frozen, batch, rng):
        grads, metrics, count = weighted_sums(trainable, frozen, batch, rng)
        if axis_name is not None:
            grads, metrics, count = jax.lax.psum((grads, metrics, count), axis_name)
        # An all-padding batch has count 0 and all-zero sums: its gradient is 0, not NaN.
        divisor = jnp.where(count > 0, count, 1.0)
        mean_grads = jax.tree_util.tree_map(
            lambda total, param: (total / divisor.astype(total.dtype)).astype(param.dtype),
            grads,
            trainable,
        )
        return mean_grads, jax.tree_util.tree_map(lambda total: total / divisor, metrics)

    def step(trainable, frozen, opt_state, batch, rng):
        if not jax.tree_util.tree_leaves(trainable):
            raise ValueError(
                "train_step: `trainable` has no arrays; pass the first half of svft_jax.split(adapted, extra=...) of an adapted tree."
            )
        if n == 1 and axis_name is None:
            # One call on the whole batch: the loss's own mean is the objective.
            grads, metrics, _ = loss_and_grads(trainable, frozen, batch, rng)
        else:
            grads, metrics = averaged(trainable, frozen, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {**metrics, "grad_norm": optax.tree.norm(grads)}

    return step


def _is_concrete_array(x, _fast_types: set = set()) -> bool:  # noqa: B006 (a cache on purpose)
    """A jax.Array holding buffers (not a tracer, not numpy). Called per leaf per step, so the
    concrete array type, once seen, is recognised without the slower ABC isinstance."""
    kind = type(x)
    if kind in _fast_types:
        return True
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        _fast_types.add(kind)
        return True
    return False


class _DonatingTrainStep:
    """The jitted step behind `make_train_step`, guarding what it donates.

    XLA deletes a donated input's buffer. The arrays a user passes in first usually share
    buffers with trees they still hold (`split` returns the adapted tree's own M and head
    arrays, which `apply` passed through from `params`; some optimiser states hold the params
    themselves), so those are copied once before donation. The arrays the previous call
    returned are donated as they are: that is the memory saving donation exists for.
    """

    def __init__(self, jitted, donated_argnums: tuple[int, ...]):
        self._jitted = jitted
        self._donated = donated_argnums
        # id -> weak reference, for the arrays the last call returned: weak, so that the step
        # keeps nothing alive; checked by identity, so a reused id never matches.
        self._produced: dict[int, weakref.ref] = {}
        self.lower = jitted.lower

    def _own(self, x) -> bool:
        ref = self._produced.get(id(x))
        return ref is not None and ref() is x

    def _guard(self, argnum: int, tree, seen: set):
        """`tree` with every array that may be shared elsewhere replaced by a copy."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        to_copy = []
        for index, leaf in enumerate(leaves):
            if not _is_concrete_array(leaf):
                continue  # numpy/python leaves are transferred (copied) by jit anyway
            if self._own(leaf) and id(leaf) not in seen:
                seen.add(id(leaf))
                continue
            if leaf.is_deleted():
                path = jax.tree_util.tree_flatten_with_path(tree)[0][index][0]
                raise ValueError(
                    f"train_step: {_ARG_NAMES[argnum]}{jax.tree_util.keystr(path)} was deleted, "
                    "having been donated to an earlier call of this train step; pass the last "
                    "call's returned arrays instead, and copy (np.asarray / jnp.copy) any you "
                    "want to keep before passing them back."
                )
            seen.add(id(leaf))
            to_copy.append(index)
        if not to_copy:
            return tree
        # A committed array keeps its placement (sharding); an uncommitted one stays free to
        # move, so the copy mixes with the other arguments exactly as the original would.
        committed = [index for index in to_copy if leaves[index].committed]
        copies = jax.device_put(
            [leaves[index] for index in committed],
            [leaves[index].sharding for index in committed],
            may_alias=False,
        )
        for index, copy in zip(committed, copies, strict=True):
            leaves[index] = copy
        for index in to_copy:
            if not leaves[index].committed:
                leaves[index] = leaves[index].copy()
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def __call__(self, trainable, frozen, opt_state, batch, rng):
        args = [trainable, frozen, opt_state, batch, rng]
        seen: set = set()
        for argnum in self._donated:
            args[argnum] = self._guard(argnum, args[argnum], seen)
        trainable, opt_state, metrics = self._jitted(*args)
        self._produced = {
            id(leaf): weakref.ref(leaf)
            for leaf in jax.tree_util.tree_leaves((trainable, opt_state))
            if _is_concrete_array(leaf)
        }
        return trainable, opt_state, metrics


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    accumulation_steps: int = 1,
    donate: tuple[str, ...] = ("opt_state",),
) -> Callable:
    """A jit-compiled SVFT train step.

    Args:
      loss_fn: loss_fn(adapted, batch, rng) -> (scalar loss, {name: scalar}) or
        (loss, metrics, count). It decides how the model runs, e.g.
        `model(**inputs, params=svft_jax.merge(adapted))`. Return a built-in loss's output as
        is (it carries its count), or `(loss, metrics, count)` from a loss of your own, so that
        accumulation weights micro-batches by how many examples/tokens each one averages over.
      tx: optimiser for the trainable half; `svft_jax.optimizer(...)` (separate head LR via
        `extra_tx`).
      accumulation_steps: micro-batches per step (lax.scan); gradients and metrics are the
        count-weighted average, i.e. the full batch's (see `train_step_fn`).
      donate: which inputs' buffers the step may reuse for its outputs: any of "opt_state"
        (default) and "trainable" (saves a copy of M). Arrays the caller passes in the first
        time (shared with `adapted` and `params`) are copied once and stay valid; the arrays a
        call returns are donated when passed to the next call, so copy any of those you keep
        (e.g. the best M) with `np.asarray` or `jnp.copy` before passing them on.
    Returns:
      train_step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, metrics);
      metrics hold "loss", "grad_norm" and loss_fn's metrics (float32 scalars, averaged over
      micro-batches). With sharded inputs (`svft_jax.distributed.shard_batch`) the same step
      runs data-parallel. `train_step.lower(...)` is the jitted function's.
    """
    if (
        isinstance(donate, str)
        or not isinstance(donate, tuple | list)
        or set(donate) - set(_DONATABLE)
    ):
        raise ValueError(
            f"donate must be a tuple of names from {sorted(_DONATABLE)}, got {donate!r}."
        )
    step = train_step_fn(loss_fn, tx, accumulation_steps=accumulation_steps)
    donated = tuple(sorted({_DONATABLE[name] for name in donate}))
    jitted = jax.jit(step, donate_argnums=donated)
    return _DonatingTrainStep(jitted, donated) if donated else jitted


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
            raise TypeError(
                f"metric_fn must return a dict of metrics, got {type(metrics).__name__}."
            )
        return metrics

    return jax.jit(step)
