"""Method × seed grids and their reports, shared by the experiments that compare presets.

`run_grid` runs one function per (preset, seed), seed-major (every method with the first seed,
then the next seed), so a run stopped early still covers every method; `summarise` turns the
per-seed rows into one row per method (mean ± sd over seeds, % of the model, % of full
fine-tuning); `markdown_table` and `plot` present it (the shape of the paper's Figure 1:
score against trainable parameters).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from experiments import presets as presets_lib

# (colour, marker) per method family in plots
STYLES = {"svft": ("tab:red", "o"), "lora": ("tab:blue", "s"), "dora": ("tab:purple", "D"),
          "vera": ("tab:green", "^"), "full": ("black", "*"), "head": ("tab:gray", "v")}


def run_grid(run_one: Callable[[presets_lib.Preset, int], dict], methods: Sequence[presets_lib.Preset],
             seeds: Sequence[int], *, log=print, on_result=None, keep_going: bool = False,
             finished_rows: Sequence[dict] = ()) -> list[dict]:
    """Every method × seed, seed-major. Returns the per-seed rows (each has "method" and "seed").

    Args:
      run_one: (preset, seed) -> row dict.
      methods, seeds: the grid.
      log: progress lines.
      on_result: called with the rows so far after each (method, seed), e.g. to write files.
      keep_going: log a failing (method, seed) and go on instead of raising.
      finished_rows: rows of an earlier, interrupted run with the same config; their
        (method, seed) pairs are not run again.
    """
    rows = list(finished_rows)
    done = {(row["method"], row["seed"]) for row in rows}
    for seed in seeds:
        for preset in methods:
            if (preset.name, seed) in done:
                continue
            log(f"== {preset.name} seed={seed}")
            try:
                rows.append(run_one(preset, seed))
            except Exception:  # noqa: BLE001 - one failing method must not cost the other runs
                if not keep_going:
                    raise
                log(f"!! {preset.name} seed={seed} failed:\n{traceback.format_exc()}")
                continue
            if on_result is not None:
                on_result(rows)
    return rows


def summarise(rows: list[dict], metric: str = "test_accuracy", reference: str = "full_ft") -> list[dict]:
    """One row per method: mean ± sd over seeds, % of the model, % of the reference's score.

    Args:
      rows: per-seed rows with method, seed, trainable, total, `metric`, step_time_s and
        (optionally) validation_accuracy.
      metric: the score to average.
      reference: the method whose mean is 100 % ("% of full FT").
    """
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    ref = by_method.get(reference)
    ref_mean = float(np.mean([r[metric] for r in ref])) if ref else None
    table = []
    for name, group in by_method.items():
        scores = np.array([r[metric] for r in group])
        mean = float(scores.mean())
        validation = [r.get("validation_accuracy") for r in group]
        table.append(dict(
            method=name, trainable=group[0]["trainable"],
            percent_of_model=100.0 * group[0]["trainable"] / group[0]["total"],
            **{f"{metric}_mean": mean, f"{metric}_sd": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0},
            validation_accuracy_mean=None if validation[0] is None else float(np.mean(validation)),
            percent_of_full_ft=100.0 * mean / ref_mean if ref_mean else None,
            step_time_s=float(np.median([r["step_time_s"] for r in group])),
            seeds=len(group),
        ))
    return table


def markdown_table(table: list[dict], metric: str = "test_accuracy", label: str = "test accuracy") -> str:
    """The summary as a markdown table (scores in %)."""
    lines = [f"| method | trainable params | % of model | {label} (mean ± sd) | % of full FT | step time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in table:
        full = "—" if row["percent_of_full_ft"] is None else f"{row['percent_of_full_ft']:.1f}"
        spread = f"± {100 * row[f'{metric}_sd']:.2f}" if row["seeds"] > 1 else "(1 seed)"
        lines.append(f"| {row['method']} | {row['trainable']:,} | {row['percent_of_model']:.4f} | "
                     f"{100 * row[f'{metric}_mean']:.2f} {spread} | "
                     f"{full} | {row['step_time_s']:.3f} |")
    return "\n".join(lines)


def _family(name: str) -> str:
    try:
        return presets_lib.get(name).method
    except ValueError:
        return ""


def plot(table: list[dict], path: Path, *, title: str, metric: str = "test_accuracy",
         ylabel: str = "test accuracy (%)", xlabel: str = "trainable parameters (log scale; head included)") -> None:
    """Score vs trainable parameters (log x), one marker per method, error bars = sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[int, list[dict]] = {}  # methods with the same budget share an x position
    for row in table:
        groups.setdefault(row["trainable"], []).append(row)
    for trainable, rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: -r[f"{metric}_mean"])
        top = 100 * rows[0][f"{metric}_mean"]
        for rank, row in enumerate(rows):
            color, marker = STYLES.get(_family(row["method"]), ("k", "x"))
            ax.errorbar(trainable, 100 * row[f"{metric}_mean"], yerr=100 * row[f"{metric}_sd"],
                        fmt=marker, color=color, capsize=3, markersize=8)
            # labels of one budget are stacked beside the group's best point, best first
            ax.annotate(row["method"], (trainable, top), textcoords="offset points",
                        xytext=(8, 4 - 11 * rank), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
