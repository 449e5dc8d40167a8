"""The generic SVFT training driver: one loop for every experiment.

An experiment builds a `Task` (adapted params, a loss, data) and calls `run(task, config)`;
the driver adds the optimiser (AdamW on M with warmup + linear/cosine decay, a separate
learning rate for a new head), gradient accumulation, data parallelism over all devices
(`jax.sharding`, multi-process aware), periodic evaluation, best-checkpoint selection, a
tqdm bar and JSON/CSV metric logs. See `experiments/README.md` for the contract.

Before saving a checkpoint the driver checks that the eval metrics are finite; a NaN or Inf
stops the run (FloatingPointError) with the last finite checkpoint left as it was.

    python -m experiments.harness.train --config.steps=30 --config.output_dir=/tmp/svft_demo

runs a built-in demo (a tiny random Flax BERT classifier on synthetic tokens).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import svft_jax
from experiments.harness import config as config_lib
from experiments.harness import data
from svft_jax import distributed
from svft_jax.training import make_eval_step, make_schedule, make_train_step

LOG_FORMATS = ("json", "csv")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs besides the task. Override from the command line with
    `experiments.harness.config.parse` (`--config.steps=10`); see experiments/README.md per field."""

    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    head_learning_rate: float | None = None
    weight_decay: float = 0.0
    head_weight_decay: float | None = None
    warmup_fraction: float = 0.1
    schedule: str = "linear"
    max_grad_norm: float | None = None
    accumulation_steps: int = 1
    eval_every: int = 0
    eval_at_start: bool = False
    log_every: int = 10
    seed: int = 0
    output_dir: str | None = None
    log_format: str = "json,csv"
    selection_metric: str = "loss"
    selection_mode: str = "min"
    data_parallel: bool = True
    progress: bool = True

    def __post_init__(self):
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}.")

        for name in ("steps", "batch_size", "accumulation_steps", "log_every"):
            positive_int(name)
        if self.batch_size % self.accumulation_steps:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} must be divisible by accumulation_steps={self.accumulation_steps}.")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"TrainConfig.eval_every must be an int ≥ 0 (0: evaluate only at the end), got {self.eval_every!r}.")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise ValueError(f"TrainConfig.warmup_fraction must be in [0, 1], got {self.warmup_fraction!r}.")
        if self.selection_mode not in ("min", "max"):
            raise ValueError(f"TrainConfig.selection_mode must be 'min' or 'max', got {self.selection_mode!r}.")
        make_schedule(self.schedule, 1.0, 1)  # validates the name
        unknown = set(self.log_formats) - set(LOG_FORMATS)
        if unknown:
            raise ValueError(f"TrainConfig.log_format={self.log_format!r}: unknown {sorted(unknown)}; use a comma-joined subset of {LOG_FORMATS} or 'none'.")

    @property
    def log_formats(self) -> tuple[str, ...]:
        if self.log_format.strip().lower() in ("", "none"):
            return ()
        return tuple(part.strip() for part in self.log_format.split(",") if part.strip())

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_fraction * self.steps))


@dataclasses.dataclass
class Task:
    """What an experiment supplies; see the module docstring of the API note for details.

    Attributes:
      adapted: the adapted parameter tree (`svft_jax.apply` or a baseline), head included.
      loss_fn: loss_fn(adapted, batch, rng) -> (scalar loss, {name: scalar}).
      train_data: train_data(epoch) -> iterable of batches (pytrees of arrays, leading axis =
        the global batch, or this process's share of it when running multi-process).
      eval_data: () -> iterable over the evaluation set (fresh on every call), or None.
      metric_fn: metric_fn(adapted, batch) -> {name: scalar or per-example array}; default:
        loss_fn's loss and metrics with a fixed rng.
      aggregate_fn: list of per-batch metric dicts (numpy) -> {name: float}; default
        (`mean_metrics`): per-example (B,) arrays averaged over the rows whose `valid` is
        True (the padding rule of `experiments.harness.data`), scalars weighted by batch size.
      extra: regex of fully-trainable extra leaves (a new head), trained at
        `head_learning_rate`.
      full_finetune: every leaf trains (full fine-tuning): `extra` leaves at
        `head_learning_rate`, all others at `learning_rate`.
      count_tokens: batch -> number of tokens, for the tokens/s readout (default: examples).
      name: shown in logs.
    """

    adapted: Any
    loss_fn: Callable
    train_data: Callable[[int], Iterable]
    eval_data: Callable[[], Iterable] | None = None
    metric_fn: Callable | None = None
    aggregate_fn: Callable | None = None
    extra: str | None = None
    full_finetune: bool = False
    count_tokens: Callable | None = None
    name: str = "task"

    @property
    def trainable_filter(self) -> str | None:
        """The `extra` regex that `svft_jax.split` gets: every leaf for full fine-tuning."""
        return ".*" if self.full_finetune else self.extra


# ----------------------------------------------------------------------------- config


def parse_config(argv: list[str] | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """`base` with command-line overrides `--config.name=value` (or `--name=value`).

    A thin wrapper of `experiments.harness.config.parse` (the harness's one config reader) for
    drivers that have no options of their own.

    Args:
      argv: arguments without the program name (default: sys.argv[1:]).
      base: the experiment's defaults (default: TrainConfig()).
    Returns:
      A new, validated TrainConfig.
    Raises:
      ValueError: for an unknown field (the message lists the valid ones) or a bad value.
    """
    (config,) = config_lib.parse(argv, TrainConfig() if base is None else base)
    return config


def keep_freed_memory() -> bool:
    """Make this process's malloc keep the memory XLA:CPU frees, for the next step to reuse.

    XLA:CPU allocates a step's scratch (often hundreds of MiB) on its worker threads and frees it
    at the end of the step. glibc serves such blocks from fresh `mmap`s (a worker thread's arena
    cannot hold them) and unmaps them on free, so every step page-faults its whole scratch in
    anew and the kernel zeroes every page: on SmolLM2 that is ~0.26 M minor faults and 0.4–0.7 s
    of system CPU per step (`experiments/bench/llm_step.py`). One arena, no mmap and no trimming
    (`mallopt`) keep the freed blocks in the heap instead: no faults after the first step. The
    price: the process keeps its peak heap (a training process does anyway).

    Process-wide, so the harness's entry points call it, first thing, before JAX starts its
    threads (a library should not); it changes no result. Linux/glibc only (elsewhere a no-op).

    Returns:
      True where the settings were applied.
    """
    import ctypes
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # malloc.h
    return bool(mallopt(m_arena_max, 1) and mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2**31 - 1))


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the OS (glibc `malloc_trim(0)`).

    `keep_freed_memory` keeps what XLA frees so that the steps of one run reuse it; across the
    runs of one process (a sweep: other methods, other scratch sizes) that kept heap only grows —
    on the addition experiment by ~0.6 GB of resident memory per run (3.3 → 13.4 GB over 16
    runs). `run` calls this first, so each run starts from the memory its predecessors still
    hold, not from their peaks (measured on that process: 4.73 → 3.58 GB). Changes no result;
    Linux/glibc only (elsewhere a no-op).

    Returns:
      True where memory was given back.
    """
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


_OPTIMIZERS: dict = {}


def make_optimizer(config: TrainConfig, extra: str | None = None, *, full_finetune: bool = False,
                   learning_rate_in_state: bool = False):
    """AdamW on M (and gates) and, with its own LR, on the `extra` leaves; frozen leaves get none.

    With `full_finetune`, every leaf trains: the `extra` leaves at `head_learning_rate`, all
    others at `learning_rate` (the tree has no adapter nodes then).

    With `learning_rate_in_state`, each peak learning rate is a value of the optimiser state
    (`optax.inject_hyperparams(optax.scale)`) times a unit-peak schedule, instead of a constant
    of the program: runs that differ only in learning rate (a sweep) trace to the same XLA
    program, so JAX's persistent compilation cache compiles it once. Same updates up to float
    rounding; the state has one more scalar per rate.

    The same settings give the same optimiser object, so a task run again with another seed
    reuses its compiled train step (`jit` caches on the function).

    Returns:
      (tx, {"learning_rate": schedule, "head_learning_rate": schedule}).
    """
    key = (config.steps, config.learning_rate, config.head_learning_rate, config.weight_decay,
           config.head_weight_decay, config.warmup_fraction, config.schedule, config.max_grad_norm,
           extra, full_finetune, learning_rate_in_state)
    if key not in _OPTIMIZERS:
        _OPTIMIZERS[key] = _make_optimizer(config, extra, full_finetune, learning_rate_in_state)
    return _OPTIMIZERS[key]


def _adamw_peak_in_state(peak: float, unit_schedule, weight_decay: float) -> optax.GradientTransformation:
    """optax.adamw(peak * unit_schedule, weight_decay) with `peak` held in the state, not the program."""
    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay),
                       optax.scale_by_schedule(unit_schedule), optax.inject_hyperparams(optax.scale)(step_size=-peak))


def _make_optimizer(config: TrainConfig, extra: str | None, full_finetune: bool, learning_rate_in_state: bool = False):
    def adamw(peak, weight_decay):
        schedule = make_schedule(config.schedule, peak, config.steps, config.warmup_steps)
        if learning_rate_in_state:
            unit = make_schedule(config.schedule, 1.0, config.steps, config.warmup_steps)
            parts = [_adamw_peak_in_state(peak, unit, weight_decay)]
        else:
            parts = [optax.adamw(schedule, weight_decay=weight_decay)]
        if config.max_grad_norm is not None:
            parts.insert(0, optax.clip_by_global_norm(config.max_grad_norm))
        return optax.chain(*parts), schedule

    tx_m, schedule_m = adamw(config.learning_rate, config.weight_decay)
    head_lr = config.learning_rate if config.head_learning_rate is None else config.head_learning_rate
    head_wd = config.weight_decay if config.head_weight_decay is None else config.head_weight_decay
    tx_head, schedule_head = adamw(head_lr, head_wd)
    schedules = {"learning_rate": schedule_m, "head_learning_rate": schedule_head}
    if full_finetune:
        return optax.multi_transform({"weights": tx_m, "head": tx_head}, functools.partial(_full_labels, extra=extra)), schedules
    return svft_jax.optimizer(tx_m, extra=extra, extra_tx=tx_head), schedules


def _full_labels(tree, extra: str | None):
    """'head' on leaves whose '/'-joined path matches `extra`, 'weights' on every other leaf."""
    def label(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        return "head" if extra is not None and re.fullmatch(extra, name) else "weights"

    return jax.tree_util.tree_map_with_path(label, tree)


_STEPS: collections.OrderedDict = collections.OrderedDict()


def _cached(key, build):
    """A small LRU of compiled steps: the same loss/metric function and optimiser (a task run
    again with another seed) reuse one `jit` and its compilations."""
    if key in _STEPS:
        _STEPS.move_to_end(key)
    else:
        _STEPS[key] = build()
        if len(_STEPS) > 32:
            _STEPS.popitem(last=False)
    return _STEPS[key]


# ----------------------------------------------------------------------------- logging


def _keep_previous(path: Path) -> None:
    """Move an existing file aside (`name.old-1`, `name.old-2`, ...) instead of overwriting it."""
    if path.exists():
        index = 1
        while path.with_name(f"{path.name}.old-{index}").exists():
            index += 1
        path.rename(path.with_name(f"{path.name}.old-{index}"))


class MetricsLog:
    """Rows of metrics to `<name>.jsonl` and `<name>.csv` (columns fixed by the first row).

    A fresh run moves an earlier run's files aside (`.old-N`); a resumed run (`append=True`)
    continues them, keeping the CSV's existing columns.
    """

    def __init__(self, directory: Path | None, name: str, formats: tuple[str, ...], leading: tuple[str, ...],
                 trailing: tuple[str, ...] = ("elapsed_s",), append: bool = False):
        self.rows: list[dict] = []
        self.paths: dict[str, Path] = {}
        self._leading, self._trailing = leading, trailing
        self._columns: list[str] | None = None
        if directory is not None and jax.process_index() == 0:
            for fmt in formats:
                path = directory / f"{name}.{'jsonl' if fmt == 'json' else 'csv'}"
                self.paths[fmt] = path
                if not append:
                    _keep_previous(path)
                elif fmt == "csv" and path.exists() and path.stat().st_size:
                    with path.open(newline="") as f:
                        self._columns = next(csv.reader(f))

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if "json" in self.paths:
            with self.paths["json"].open("a") as f:
                f.write(json.dumps(row) + "\n")
        if "csv" in self.paths:
            if self._columns is None:
                fixed = (*self._leading, *self._trailing)
                rest = sorted(k for k in row if k not in fixed)
                self._columns = [k for k in self._leading if k in row] + rest + [k for k in self._trailing if k in row]
                with self.paths["csv"].open("a", newline="") as f:
                    csv.writer(f).writerow(self._columns)
            with self.paths["csv"].open("a", newline="") as f:
                csv.writer(f).writerow([row.get(k, "") for k in self._columns])


def _to_float(value) -> float:
    return float(np.asarray(value))


# ----------------------------------------------------------------------------- loop


def _endless_batches(train_data: Callable[[int], Iterable]) -> Iterator:
    epoch = 0
    while True:
        empty = True
        for batch in train_data(epoch):
            empty = False
            yield batch
        if empty:
            raise ValueError(f"Task.train_data({epoch}) yielded no batches.")
        epoch += 1


def _num_examples(batch) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 1


def _default_metric_fn(loss_fn):
    def metric_fn(adapted, batch):
        loss, metrics = loss_fn(adapted, batch, jax.random.key(0))
        return {**metrics, "loss": loss}

    return metric_fn


def mean_metrics(per_batch: list[dict], sizes: list[int] | None = None) -> dict:
    """The default aggregate: the mean of each metric over the evaluation set.

    A per-example metric (an array whose leading axis is the batch) is averaged over the rows
    whose `valid` entry is True (`experiments.harness.data.pad_rows` marks padding that way; without
    `valid` every row counts). A scalar metric is weighted by its batch's real rows.

    Args:
      per_batch: one {name: numpy value} dict per eval batch.
      sizes: examples per batch, weighting scalar metrics of batches without `valid`
        (default: 1 each).
    Returns:
      {name: float}; `valid` itself is not reported.
    """
    totals: dict[str, float] = {}
    counts: dict[str, float] = {}
    for index, metrics in enumerate(per_batch):
        rows = None
        if data.VALID in metrics:
            valid = np.asarray(metrics[data.VALID], bool)
            rows = valid
        for name, value in metrics.items():
            if name == data.VALID:
                continue
            value = np.asarray(value, np.float64)
            if value.ndim:
                weights = rows if rows is not None and rows.shape == value.shape[:1] else np.ones(value.shape[0], bool)
                totals[name] = totals.get(name, 0.0) + float(np.sum(value[weights]))
                counts[name] = counts.get(name, 0.0) + float(np.sum(weights))
            else:
                weight = float(np.sum(rows)) if rows is not None else float(sizes[index] if sizes else 1)
                totals[name] = totals.get(name, 0.0) + float(value) * weight
                counts[name] = counts.get(name, 0.0) + weight
    return {name: totals[name] / counts[name] for name in totals}


def evaluate(task: Task, eval_step, trainable, frozen, place_batch, batches: Iterable | None = None) -> dict:
    """Run `eval_step` over `batches` (default `task.eval_data()`) and aggregate; {} without data."""
    if batches is None:
        if task.eval_data is None:
            return {}
        batches = task.eval_data()
    per_batch, sizes = [], []
    for batch in batches:
        sizes.append(_num_examples(batch) * jax.process_count())
        per_batch.append(distributed.gather_to_host(eval_step(trainable, frozen, place_batch(batch, eval_mode=True))))
    if not per_batch:
        raise ValueError(f"Task {task.name!r}: the evaluation data yielded no batches.")
    if task.aggregate_fn is not None:
        return {k: float(v) for k, v in task.aggregate_fn(per_batch).items()}
    return mean_metrics(per_batch, sizes)


def evaluate_model(task: Task, adapted, batches: Iterable | None = None) -> dict:
    """Evaluate a (trained) adapted tree with the task's metric and aggregate functions.

    For extra splits after `run` (a test set, GLUE's mismatched validation):
    `evaluate_model(task, results["adapted"], data.eval_batches(test, encode, batch_size=64))`.

    Args:
      task: the task (its metric_fn / aggregate_fn / extra are used).
      adapted: the tree to evaluate, e.g. `run(...)["adapted"]` (the best model).
      batches: iterable of batches (default: `task.eval_data()`).
    Returns:
      {name: float}.
    """
    trainable, frozen = svft_jax.split(adapted, extra=task.trainable_filter)
    metric_fn = task.metric_fn or _default_metric_fn(task.loss_fn)
    eval_step = _cached(("eval", metric_fn), lambda: make_eval_step(metric_fn))
    return evaluate(task, eval_step, trainable, frozen, lambda batch, eval_mode=False: batch, batches)


def _check_finite(metrics: dict, step: int, last_saved: int | None) -> None:
    """Refuse non-finite eval metrics before they reach a checkpoint (and its best-N ranking)."""
    bad = {name: value for name, value in metrics.items() if not math.isfinite(value)}
    if bad:
        kept = f"the last checkpoint (step {last_saved}) is intact" if last_saved is not None else "no checkpoint was written"
        raise FloatingPointError(
            f"non-finite eval metrics at step {step}: {bad}; step {step} was not saved and training stopped "
            f"({kept}). Lower the learning rate, add max_grad_norm, or check the data."
        )


def _better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def _restore(checkpoint_manager, trainable, opt_state):
    if checkpoint_manager is None:
        return 0, trainable, opt_state
    restored = checkpoint_manager.restore_latest(trainable, opt_state)
    if restored is None:
        return 0, trainable, opt_state
    if isinstance(restored, dict):
        restored = (restored["step"], restored["trainable"], restored["opt_state"])
    step, trainable, opt_state = restored
    return int(step), trainable, opt_state


def run(task: Task, config: TrainConfig, *, checkpoint_manager=None, tx: optax.GradientTransformation | None = None) -> dict:
    """Train `task` for `config.steps` optimiser steps; evaluate, log, keep the best M.

    Args:
      task: the experiment's `Task`.
      config: a `TrainConfig`.
      checkpoint_manager: optional object with `save(step, trainable, opt_state, metrics)`
        (called after each evaluation and at the end) and `restore_latest(trainable,
        opt_state) -> None | (step, trainable, opt_state)` (called once, before training).
      tx: an optimiser overriding `make_optimizer(config, task.extra)`.
    Returns:
      {"final_eval", "best_eval", "best_step", "best_trainable", "trainable", "adapted" (the
      best model, combine(best_trainable, frozen)), "history": {"train": rows, "eval": rows},
      "train_time_s", "steps", "log_paths", "config"}.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}.")
    release_freed_memory()  # what earlier runs of this process freed (a sweep), not kept at their peaks
    out_dir = Path(config.output_dir) if config.output_dir else None
    is_main = jax.process_index() == 0
    trainable_host, frozen_host = svft_jax.split(task.adapted, extra=task.trainable_filter)
    if not jax.tree_util.tree_leaves(trainable_host):
        raise ValueError("Task.adapted has no trainable leaves: pass the output of svft_jax.apply (and set Task.extra for a head).")
    schedules = {}
    if tx is None:
        tx, schedules = make_optimizer(config, task.extra, full_finetune=task.full_finetune)
    trainable = jax.tree_util.tree_map(jnp.array, trainable_host)  # a copy: the step donates it
    opt_state = tx.init(trainable)
    start_step, trainable, opt_state = _restore(checkpoint_manager, trainable, opt_state)
    resumed = start_step > 0
    if out_dir is not None and is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "results.json"):  # an earlier run's files are moved aside, never overwritten
            _keep_previous(out_dir / name)
        (out_dir / "config.json").write_text(json.dumps({**dataclasses.asdict(config), "task": task.name, "resumed_from_step": start_step}, indent=2))

    mesh = None
    if config.data_parallel and jax.device_count() > 1:
        mesh = distributed.make_mesh()
        if config.batch_size % mesh.shape[distributed.DATA]:
            raise ValueError(f"TrainConfig.batch_size={config.batch_size} must be divisible by the {mesh.shape[distributed.DATA]} devices of the data axis (or set data_parallel=False).")
        trainable = distributed.shard_params(trainable, mesh, extra=task.trainable_filter)
        frozen = distributed.shard_params(frozen_host, mesh)  # the head's leaves are holes in this half
        opt_state = distributed.replicate(opt_state, mesh)
    else:
        frozen = frozen_host

    def place_batch(batch, eval_mode=False):
        if mesh is None:
            return batch
        rows = _num_examples(batch) * jax.process_count()
        if eval_mode and rows % mesh.shape[distributed.DATA] and jax.process_count() == 1:
            return distributed.replicate(batch, mesh)  # an odd-sized last eval batch
        return distributed.shard_batch(batch, mesh)

    train_step = _cached(("train", task.loss_fn, tx, config.accumulation_steps),
                         lambda: make_train_step(task.loss_fn, tx, accumulation_steps=config.accumulation_steps,
                                                 donate=("trainable", "opt_state")))
    metric_fn = task.metric_fn or _default_metric_fn(task.loss_fn)
    eval_step = _cached(("eval", metric_fn), lambda: make_eval_step(metric_fn))
    train_log = MetricsLog(out_dir, "train_metrics", config.log_formats,
                           ("step", "loss", "grad_norm", "learning_rate", "head_learning_rate"), ("examples_per_s", "tokens_per_s", "elapsed_s"),
                           append=resumed)
    eval_log = MetricsLog(out_dir, "eval_metrics", config.log_formats, ("step",), append=resumed)

    best = {"value": None, "step": None, "metrics": {}, "trainable": None}
    saved = {"step": start_step if resumed else None, "eval_s": 0.0}

    def run_eval(step: int, elapsed: float) -> dict:
        tic = time.perf_counter()
        metrics = evaluate(task, eval_step, trainable, frozen, place_batch)
        saved["eval_s"] += time.perf_counter() - tic
        if metrics:
            eval_log.write({"step": step, **metrics, "elapsed_s": round(elapsed, 3)})
            _check_finite(metrics, step, saved["step"])
            if config.selection_metric not in metrics:
                raise ValueError(f"TrainConfig.selection_metric={config.selection_metric!r} is not among the eval metrics {sorted(metrics)}.")
            if _better(metrics[config.selection_metric], best["value"], config.selection_mode):
                best.update(value=metrics[config.selection_metric], step=step, metrics=metrics,
                            trainable=distributed.gather_to_host(trainable))
        if checkpoint_manager is not None and not (resumed and step == start_step):  # that step is saved already
            checkpoint_manager.save(step, trainable, opt_state, metrics)
            saved["step"] = step
        return metrics

    batches = _endless_batches(task.train_data)
    for _ in range(start_step):  # resume: skip the batches already trained on
        next(batches)
    key = jax.random.key(config.seed)
    progress = None
    if config.progress and is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.steps, initial=start_step, desc=task.name, unit="step", dynamic_ncols=True)

    if config.eval_at_start and start_step == 0:
        run_eval(0, 0.0)  # the untouched model's score: the baseline every later eval is read against
    start = time.perf_counter()
    window_metrics, window_examples, window_tokens, window_start = [], 0, 0, time.perf_counter()
    final_eval = {}
    step = start_step
    while step < config.steps:
        batch = next(batches)
        rows = _num_examples(batch) * jax.process_count()
        if rows != config.batch_size:
            raise ValueError(f"Task.train_data yielded a batch of {rows} examples; TrainConfig.batch_size is {config.batch_size} (drop the last partial batch).")
        window_examples += rows
        window_tokens += int(task.count_tokens(batch)) * jax.process_count() if task.count_tokens else 0
        trainable, opt_state, metrics = train_step(trainable, frozen, opt_state, place_batch(batch), jax.random.fold_in(key, step))
        window_metrics.append(metrics)
        step += 1
        if step % config.log_every == 0 or step == config.steps:
            host = [jax.tree_util.tree_map(_to_float, m) for m in window_metrics]
            seconds = max(time.perf_counter() - window_start, 1e-9)
            row = {"step": step, **{name: float(np.mean([m[name] for m in host])) for name in host[0]}}
            for name, schedule in schedules.items():
                row[name] = float(schedule(step - 1))
            row["examples_per_s"] = window_examples / seconds
            if task.count_tokens:
                row["tokens_per_s"] = window_tokens / seconds
            row["elapsed_s"] = round(time.perf_counter() - start, 3)
            if not all(math.isfinite(v) for v in row.values()):
                raise FloatingPointError(f"non-finite training metrics at step {step}: {row}; lower the learning rate or check the data.")
            train_log.write(row)
            if progress is not None:
                rate = row.get("tokens_per_s", row["examples_per_s"])
                progress.set_postfix(loss=f"{row['loss']:.4f}", **{"tok/s" if task.count_tokens else "ex/s": f"{rate:.0f}"})
            window_metrics, window_examples, window_tokens, window_start = [], 0, 0, time.perf_counter()
        if progress is not None:
            progress.update(1)
        if config.eval_every and step % config.eval_every == 0 and step != config.steps:
            run_eval(step, time.perf_counter() - start)
    train_time = time.perf_counter() - start
    final_eval = run_eval(step, train_time)
    if progress is not None:
        progress.close()

    final_trainable = distributed.gather_to_host(trainable)
    if best["trainable"] is None:  # no eval set: the last M is the best we know
        best.update(step=step, metrics=final_eval, trainable=final_trainable)
    results = {
        "final_eval": final_eval,
        "best_eval": best["metrics"],
        "best_step": best["step"],
        "best_trainable": best["trainable"],
        "trainable": final_trainable,
        "adapted": svft_jax.combine(best["trainable"], frozen_host),
        "history": {"train": train_log.rows, "eval": eval_log.rows},
        "train_time_s": train_time,
        "eval_time_s": saved["eval_s"],
        "steps": step,
        "log_paths": {f"{log_name}.{fmt}": str(path) for log_name, log in (("train", train_log), ("eval", eval_log)) for fmt, path in log.paths.items()},
        "config": dataclasses.asdict(config),
    }
    if out_dir is not None and is_main:
        summary = {k: results[k] for k in ("final_eval", "best_eval", "best_step", "train_time_s", "steps", "config")}
        (out_dir / "results.json").write_text(json.dumps({**summary, "task": task.name}, indent=2))
        results["log_paths"]["results"] = str(out_dir / "results.json")
    return results


# ----------------------------------------------------------------------------- demo task


def demo_task(config: TrainConfig, *, num_train: int = 256, num_eval: int = 64, seq_len: int = 16, num_layers: int = 2) -> Task:
    """A tiny randomly initialised Flax BERT classifier on synthetic tokens.

    Positive sequences draw their tokens from ids [8, 36), negative ones from [36, 64): every
    position carries the label, so a few steps of M and head training lower the loss.
    SVFT (banded, d=1) on every attention/MLP kernel; the classifier head is trained in full.
    Data go through the harness's one path (`experiments.harness.data`).
    """
    import optax as _optax

    from experiments.harness import models
    from svft_jax.training import losses

    model, params = models.tiny_bert_classifier(num_layers=num_layers, seq_len=seq_len, seed=config.seed)
    adapted = svft_jax.apply(params, "banded", d=1, svd_backend="numpy")

    rng = np.random.default_rng(config.seed)

    def make_split(n):
        positive = rng.random(n) < 0.5
        tokens = np.where(positive[:, None], rng.integers(8, 36, size=(n, seq_len)), rng.integers(36, 64, size=(n, seq_len)))
        return [{"input_ids": row.astype(np.int32), "attention_mask": np.ones(seq_len, np.int32), "labels": np.int32(label)}
                for row, label in zip(tokens, positive, strict=True)]

    train, evaluation = make_split(num_train), make_split(num_eval)

    run_model = models.run_adapted(model)  # the adapted tree, never a merged copy

    def logits_of(adapted, batch):
        return run_model(batch["input_ids"], attention_mask=batch["attention_mask"], params=adapted).logits

    def loss_fn(adapted, batch, rng):
        del rng  # no dropout in this tiny config
        return losses.classification_loss(logits_of(adapted, batch), batch["labels"])

    def metric_fn(adapted, batch):
        logits = logits_of(adapted, batch)
        return {"loss": _optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"]),
                "accuracy": (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32), data.VALID: batch[data.VALID]}

    identity = lambda example: example  # noqa: E731  (the examples are arrays already)
    return Task(adapted=adapted, loss_fn=loss_fn, metric_fn=metric_fn,
                train_data=lambda epoch: data.train_batches(train, identity, batch_size=config.batch_size, seed=config.seed, epoch=epoch),
                eval_data=lambda: data.eval_batches(evaluation, identity, batch_size=config.batch_size),
                extra="classifier/.*", count_tokens=lambda batch: int(np.sum(batch["attention_mask"])), name="demo-bert")


def main(argv=None) -> dict:
    keep_freed_memory()
    config = parse_config(argv, TrainConfig(steps=30, batch_size=16, learning_rate=5e-2, head_learning_rate=2e-2,
                                            eval_every=10, log_every=5))
    results = run(demo_task(config), config)
    print(json.dumps({"best_step": results["best_step"], "best_eval": results["best_eval"], "train_time_s": results["train_time_s"]}, indent=2))
    return results


if __name__ == "__main__":
    main()
