"""What every paper task shares: its options schema, the CLI, the driver's config from a table,
and the metrics file.

Each task script defines `Options(PaperOptions)` with its own fields and calls `setup`, which
reads the command line with the harness's one config reader (`experiments.harness.config.parse`):
task flags as `--name=value`, the driver's as `--config.name=value` (or `--name=value`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import jax
import numpy as np

import svft_jax
from experiments.harness import config as config_lib
from experiments.harness import presets
from experiments.harness.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class PaperOptions:
    """Flags every paper task has.

    Attributes:
      model: hub name or local directory for from_pretrained, or 'tiny' (a random tiny
        config, for tests); '' means the table's default model.
      method: a preset of `experiments.harness.presets` (svft_plain, svft_banded_d2, lora_r8, ...,
        or a parsed width such as svft_random_d16; 'head' is head_only).
      targets: regex of adapted kernels (None: the table's, per method where the paper
        adapts different projections per method).
      epochs: training epochs (None: the paper's); --config.steps overrides.
      output_dir: where metrics.json and the driver's logs go.
      overwrite: replace an existing metrics.json.
      data_dir: TFDS data_dir holding the array_record files.
      download: let TFDS download and prepare missing data.
      seed: data order, adapter initialisation and dropout seed.
    """

    model: str = ""
    method: str = "svft_plain"
    targets: str | None = None
    epochs: float | None = None
    output_dir: str | None = None
    overwrite: bool = False
    data_dir: str | None = None
    download: bool = False
    seed: int = 0

    def __post_init__(self):
        self.preset  # noqa: B018  (validates the name before any work)
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}.")

    @property
    def preset(self) -> presets.Preset:
        return presets.get("head_only" if self.method == "head" else self.method)


def setup(argv: Sequence[str] | None, options: PaperOptions, table, description: str = "", **train_fields):
    """Parse the command line of a paper task.

    Args:
      argv: flags (None: sys.argv[1:]).
      options: the task's default options.
      table: the paper table's `TableConfig` (hyperparameters and their sources).
      train_fields: task-specific driver defaults (selection_metric=..., ...).
    Returns:
      (options, train config, names of the flags given). The learning rate is the table's
      for the method unless `--config.learning_rate` is given; steps are set later by
      `with_steps` unless `--config.steps` is given.
    Raises:
      FileExistsError: if output_dir already holds a metrics.json and --overwrite is not set
        (checked before any data or model is loaded).
    """
    base = table.train_config(**train_fields)
    options, train = config_lib.parse(argv, options, base, description=description)
    given = config_lib.flags_given(argv)
    # One seed and one output folder per run: the options' (the driver's logs go there too).
    changes = {"seed": options.seed, "output_dir": options.output_dir}
    if "learning_rate" not in given:
        changes["learning_rate"] = table.learning_rate(options.preset.name)
    if not options.model:
        options = dataclasses.replace(options, model=table.model)
    train = dataclasses.replace(train, **changes)
    check_output_dir(options.output_dir, overwrite=options.overwrite)
    return options, train, given


def with_steps(train: TrainConfig, given: set[str], *, epochs: float, num_examples: int) -> TrainConfig:
    """`train` with steps = `epochs` passes over `num_examples` at the final batch size, unless given."""
    if "steps" in given:
        return train
    return dataclasses.replace(train, steps=steps_for(epochs, num_examples, train.batch_size))


def steps_for(epochs: float, num_examples: int, batch_size: int) -> int:
    """Optimiser steps for `epochs` passes over `num_examples` (full batches only, at least 1)."""
    if epochs <= 0:
        raise ValueError(f"--epochs must be positive, got {epochs}.")
    return max(1, math.floor(epochs * (num_examples // batch_size)))


def write_metrics(output_dir: str | None, metrics: dict, *, overwrite: bool, name: str = "metrics.json") -> str | None:
    """Write `metrics` as JSON to output_dir/name; refuses to replace a file unless `overwrite`."""
    import json

    if output_dir is None:
        return None
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite or choose another --output_dir.")
    with open(path, "w") as handle:
        json.dump(config_lib.json_ready(metrics), handle, indent=2, sort_keys=True)
    return path


def check_output_dir(output_dir: str | None, *, overwrite: bool, name: str = "metrics.json") -> None:
    """Fail before training (not after) if the metrics file would be overwritten."""
    if output_dir is not None and os.path.exists(os.path.join(output_dir, name)) and not overwrite:
        raise FileExistsError(f"{os.path.join(output_dir, name)} exists; pass --overwrite or choose another --output_dir.")


def run_summary(adapted, extra: str | None, results: dict, config: TrainConfig) -> dict:
    """Parameter counts and training facts that every metrics file carries."""
    trainable, _ = svft_jax.split(adapted, extra=extra)
    count = lambda tree: int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))  # noqa: E731
    adapter_only, _ = svft_jax.split(adapted)
    first_loss = results["history"]["train"][0]["loss"] if results["history"]["train"] else None
    return {
        "trainable_parameters": count(trainable),
        "adapter_parameters": count(adapter_only),
        "total_parameters": count(jax.eval_shape(svft_jax.merge, adapted)),  # shapes only: no second copy of a 7B model
        "steps": int(results.get("steps", config.steps)),
        "best_step": results.get("best_step"),
        "train_time_s": results.get("train_time_s"),
        "train_loss": {"first": first_loss, "last": results["history"]["train"][-1]["loss"] if first_loss is not None else None},
        "config": config_lib.to_dict(config),
    }
