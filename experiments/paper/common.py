"""Pieces every paper script shares: the adapter step, the CLI, evaluation and the metrics file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # scripts run as files need the repo root for `experiments.train`
    sys.path.insert(0, str(REPO_ROOT))

import svft_jax  # noqa: E402
from experiments.paper.configs import MethodSpec, TableConfig, parse_method  # noqa: E402


def driver():
    """The shared training driver module `experiments/train.py` (imported lazily)."""
    from experiments import train

    return train


def adapt(params, method: MethodSpec, *, targets: str | None, seed: int = 0):
    """Apply the chosen PEFT method to `params`.

    Args:
      params: the model's parameter pytree.
      method: parsed preset; 'svft' -> `svft_jax.apply`, 'lora'/'dora'/'vera' ->
        `svft_jax.baselines.<name>.apply`, 'head' -> params unchanged (train the head only).
      targets: regex of adapted kernels (None: the library's default targets).
      seed: pattern / initialisation seed.
    Returns:
      The adapted pytree.
    """
    if method.family == "head":
        return params
    if method.family == "svft":
        return svft_jax.apply(params, targets=targets, seed=seed, **method.kwargs)
    from svft_jax import baselines

    return baselines.METHODS[method.family](params, targets=targets, seed=seed, **method.kwargs)


def init_tiny(model_class, config, input_shape: tuple[int, ...]):
    """A randomly initialised HF Flax model whose init runs as ONE jitted call.

    (`model_class(config)` initialises eagerly, compiling every initializer op separately,
    which dominates a smoke test's runtime.) Returns (model, params); pass params explicitly.
    """
    model = model_class(config, seed=0, _do_init=False)
    params = jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(0), input_shape)
    return model, params


def base_parser(description: str, table: TableConfig) -> argparse.ArgumentParser:
    """Flags every script has; the driver's `--config.<field>` flags pass through untouched."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--model", default=table.model, help="hub name or local directory for from_pretrained, or 'tiny' (random tiny config, for tests)")
    parser.add_argument("--method", default="svft_plain", help="svft_plain | svft_<banded|random|topk>_d<N> | <lora|dora|vera>_r<N> | head")
    parser.add_argument("--targets", default=table.targets, help="regex of adapted kernels (default: the table's)")
    parser.add_argument("--epochs", type=float, default=None, help="training epochs (default: the paper's); --config.steps overrides")
    parser.add_argument("--output_dir", default=None, help="where metrics.json and the driver's logs go")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing metrics.json")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir holding the array_record files")
    parser.add_argument("--download", action="store_true", help="let TFDS download and prepare missing data")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """Split argv into the script's flags and the driver's `--config.*` overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, rest = parser.parse_known_args(argv)
    unknown = [flag for flag in rest if not flag.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)} (driver options are spelled --config.<field>=...)")
    method = parse_method(script_args.method)
    return script_args, method, rest


def train_config(table: TableConfig, method: MethodSpec, *, epochs: float, num_train_examples: int, overrides: Sequence[str], output_dir: str | None, seed: int, **fields):
    """The driver's TrainConfig: the table's values, then `--config.*` overrides on top.

    Steps are `epochs` passes over `num_train_examples` at the final batch size, unless
    `--config.steps` is given.
    """
    train = driver()
    try:
        learning_rate = table.learning_rate(method.name)
    except ValueError:
        if not _given(overrides, "learning_rate"):
            raise
        learning_rate = 1e-3  # replaced by the override
    base = dict(
        steps=1,
        batch_size=table.batch_size,
        accumulation_steps=table.accumulation_steps,
        learning_rate=learning_rate,
        head_learning_rate=table.head_learning_rate,
        weight_decay=table.weight_decay,
        warmup_fraction=table.warmup_fraction,
        schedule=table.schedule,
        output_dir=output_dir,
        seed=seed,
        progress=False,
    )
    base.update(fields)
    config = train.parse_config(list(overrides), base=train.TrainConfig(**base))
    if config.batch_size % config.accumulation_steps:
        raise ValueError(
            f"--config.batch_size={config.batch_size} is not divisible by --config.accumulation_steps={config.accumulation_steps}."
        )
    if not _given(overrides, "steps"):
        config = dataclasses.replace(config, steps=steps_for(epochs, num_train_examples, config.batch_size))
    return config


def _given(overrides: Sequence[str], field: str) -> bool:
    return any(flag.split("=")[0] in (f"--config.{field}",) for flag in overrides)


def steps_for(epochs: float, num_examples: int, batch_size: int) -> int:
    """Optimiser steps for `epochs` passes over `num_examples` (full batches only, at least 1)."""
    if epochs <= 0:
        raise ValueError(f"--epochs must be positive, got {epochs}.")
    return max(1, math.floor(epochs * (num_examples // batch_size)))


def evaluate(adapted, metric_fn: Callable, batches: Iterable[dict], aggregate_fn: Callable) -> dict:
    """Run a jitted `metric_fn(adapted, batch)` over `batches` and aggregate on host."""
    step = jax.jit(metric_fn)
    outputs = [jax.tree.map(np.asarray, step(adapted, batch)) for batch in batches]
    if not outputs:
        raise ValueError("evaluation set is empty.")
    return aggregate_fn(outputs)


def concat_valid(outputs: Sequence[dict], *keys: str) -> list[np.ndarray]:
    """Concatenate per-example arrays from metric outputs, dropping padded (`valid` False) rows."""
    valid = np.concatenate([np.asarray(o["valid"], bool) for o in outputs])
    return [np.concatenate([np.asarray(o[key]) for o in outputs])[valid] for key in keys]


def write_metrics(output_dir: str | None, metrics: dict, *, overwrite: bool, name: str = "metrics.json") -> str | None:
    """Write `metrics` as JSON to output_dir/name; refuses to replace a file unless `overwrite`."""
    if output_dir is None:
        return None
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite or choose another --output_dir.")
    with open(path, "w") as handle:
        json.dump(_jsonable(metrics), handle, indent=2, sort_keys=True)
    return path


def check_output_dir(output_dir: str | None, *, overwrite: bool, name: str = "metrics.json") -> None:
    """Fail before training (not after) if the metrics file would be overwritten."""
    if output_dir is not None and os.path.exists(os.path.join(output_dir, name)) and not overwrite:
        raise FileExistsError(f"{os.path.join(output_dir, name)} exists; pass --overwrite or choose another --output_dir.")


def run_summary(adapted, extra: str | None, results: dict, config) -> dict:
    """Parameter counts and training facts that every metrics file carries."""
    trainable, frozen = svft_jax.split(adapted, extra=extra)
    count = lambda tree: int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))  # noqa: E731
    return {
        "trainable_parameters": count(trainable),
        "total_parameters": count(jax.eval_shape(svft_jax.merge, adapted)),  # shapes only: no second copy of a 7B model
        "steps": int(results.get("steps", config.steps)),
        "best_step": results.get("best_step"),
        "train_time_s": results.get("train_time_s"),
        "config": dataclasses.asdict(config),
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic | np.ndarray) or hasattr(value, "__array__"):
        array = np.asarray(value)
        return array.item() if array.ndim == 0 else array.tolist()
    return value
