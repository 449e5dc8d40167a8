"""Method × seed grids and their reports, shared by the experiments that compare presets.

`run_grid` runs one function per (preset, seed), seed-major (every method with the first seed,
then the next seed), so a run stopped early still covers every method; `summarise` turns the
per-seed rows into one row per method (mean ± sd over seeds, % of the model, % of full
fine-tuning); `markdown_table` and `plot` present it (the shape of the paper's Figure 1:
score against trainable parameters).
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from experiments.harness import presets as presets_lib

RESUMED = "  (interrupted, then completed with --resume)"


def resume(results: Path, budget: dict, methods: Sequence[str], seeds: Sequence[int]) -> tuple[dict, list[dict], str]:
    """What `--resume` continues from an interrupted run's results file.

    Returns (the file's payload, its finished rows of these methods and seeds, its command marked
    as resumed — once, however often the run was resumed).
    Raises:
      ValueError when the file was made with another budget (its runs would not be comparable).
    """
    earlier = json.loads(Path(results).read_text())
    if earlier["config"] != budget:
        raise ValueError(f"--resume: {Path(results).name} was made with another budget {earlier['config']}; "
                         f"this run's is {budget}. Rerun without --resume or match the flags.")
    finished = [row for row in earlier["runs"] if row["method"] in methods and row["seed"] in seeds]
    command = earlier["command"] if earlier["command"].endswith(RESUMED) else earlier["command"] + RESUMED
    return earlier, finished, command


def status_line(done: int, total: int, minutes: float | None = None, detail: str = "") -> str:
    """A results file's run count: "Complete: N runs[detail] in M min." or "PARTIAL: N runs[detail]
    of T after M min (the run is still going or was stopped)."; without the minutes when unknown."""
    counted = f"{done} runs{detail}"
    if done >= total:
        return f"Complete: {counted}" + (f" in {minutes:.1f} min." if minutes is not None else ".")
    return f"PARTIAL: {counted} of {total}" + (f" after {minutes:.1f} min (the run is still going or was stopped)."
                                               if minutes is not None else ".")


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
            # a mean over every seed, or None where a seed has none (e.g. a row reused from a run
            # that did not score validation)
            validation_accuracy_mean=None if None in validation else float(np.mean(validation)),
            percent_of_full_ft=100.0 * mean / ref_mean if ref_mean else None,
            step_time_s=float(np.median([r["step_time_s"] for r in group])),
            seeds=len(group),
        ))
    return table


def markdown_table(table: list[dict], metric: str = "test_accuracy", label: str = "test accuracy",
                   step_label: str = "step time (s)") -> str:
    """The summary as a markdown table (scores in %); a step time of None shows as '—'.

    Args:
      step_label: the step-time column's header (e.g. naming the execution path it was timed on).
    """
    lines = [f"| method | trainable params | % of model | {label} (mean ± sd) | % of full FT | {step_label} |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in table:
        full = "—" if row["percent_of_full_ft"] is None else f"{row['percent_of_full_ft']:.1f}"
        spread = f"± {100 * row[f'{metric}_sd']:.2f}" if row["seeds"] > 1 else "(1 seed)"
        step = "—" if row["step_time_s"] is None else f"{row['step_time_s']:.3f}"
        lines.append(f"| {row['method']} | {row['trainable']:,} | {row['percent_of_model']:.4f} | "
                     f"{100 * row[f'{metric}_mean']:.2f} {spread} | "
                     f"{full} | {step} |")
    return "\n".join(lines)


def _family(name: str) -> str:
    try:
        return presets_lib.get(name).method
    except ValueError:
        return ""


def _separate(fig, ax, labels, rounds: int = 200) -> None:
    """Move labels that would overprint (methods with equal or near-equal counts and scores) apart
    vertically: each round, every overlapping pair is pushed apart by half its overlap each (the
    lower label down, the upper up) and kept inside the axes. Each label keeps a thin line to its
    point."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in labels]
    frame = ax.get_window_extent(renderer)
    y0 = np.array([box.y0 for box in boxes])
    height = np.array([box.height + 2 for box in boxes])  # 2 px between labels
    for _ in range(rounds):
        moved = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                if not (boxes[i].x0 < boxes[j].x1 and boxes[j].x0 < boxes[i].x1):
                    continue
                low, high = (i, j) if (y0[i], i) <= (y0[j], j) else (j, i)
                overlap = y0[low] + height[low] - y0[high]
                if overlap > 0:
                    y0[low] -= overlap / 2
                    y0[high] += overlap / 2
                    moved = True
        y0 = np.clip(y0, frame.y0, frame.y1 - height)
        if not moved:
            break
    for label, box, new in zip(labels, boxes, y0, strict=True):
        dx, dy = label.xyann
        label.xyann = (dx, dy + (new - box.y0) * 72.0 / fig.dpi)


def plot(table: list[dict], path: Path, *, title: str, metric: str = "test_accuracy",
         ylabel: str = "test accuracy (%)", xlabel: str = "trainable parameters (log scale; head included)",
         reference: tuple[str, float] | None = None) -> None:
    """Score vs trainable parameters (log x), one marker per method, error bars = sd over seeds.

    Args:
      table: `summarise` rows (every row needs trainable > 0: the x axis is logarithmic).
      reference: (label, score) drawn as a horizontal dashed line (e.g. an untrained baseline).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = []
    for row in sorted(table, key=lambda r: (r["trainable"], -r[f"{metric}_mean"])):
        color, marker = STYLES.get(_family(row["method"]), ("k", "x"))
        point = (row["trainable"], 100 * row[f"{metric}_mean"])
        ax.errorbar(*point, yerr=100 * row[f"{metric}_sd"], fmt=marker, color=color, capsize=3, markersize=8)
        labels.append(ax.annotate(row["method"], point, textcoords="offset points", xytext=(8, -3), fontsize=8,
                                  arrowprops=dict(arrowstyle="-", color="tab:gray", linewidth=0.5, shrinkA=0, shrinkB=4)))
    if reference is not None:
        ax.axhline(100 * reference[1], color="tab:gray", linestyle="--", linewidth=1)
        ax.annotate(reference[0], (0.99, 100 * reference[1]), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 3), fontsize=8, color="tab:gray", ha="right")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _separate(fig, ax, labels)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- learning-rate sweeps


def learning_rate_grid(preset: presets_lib.Preset, factors: Sequence[float] = (1 / 3, 1.0, 3.0)) -> tuple[float, ...]:
    """The preset's usual learning rate times each factor (the small sweep of the experiments)."""
    return tuple(float(f"{preset.learning_rate * factor:.3g}") for factor in factors)


def sweep_then_seeds(run_one: Callable[[presets_lib.Preset, int, float], dict], methods: Sequence[presets_lib.Preset],
                     seeds: Sequence[int], learning_rates: Callable[[presets_lib.Preset], Sequence[float]], *,
                     select: str = "validation_accuracy", mode: str = "max", tie_break: str | None = None,
                     extend_at_edge: int = 0, log=print, on_result=None,
                     keep_going: bool = False, finished_rows: Sequence[dict] = ()) -> tuple[list[dict], dict[str, float]]:
    """Pick each method's learning rate on validation with the first seed, then run the other seeds at it.

    Phase 1 runs every method at each of its `learning_rates(preset)` with `seeds[0]`; the
    learning rate whose row has the best `select` score (validation, never test) is the
    method's. Phase 2 runs `seeds[1:]` at that rate, seed-major, so a stopped run still covers
    every method. The first seed's run at the chosen rate is that seed's final run (its test
    score was not looked at when choosing).

    Args:
      run_one: (preset, seed, learning_rate) -> row dict with `select` in it.
      methods, seeds: the grid; learning_rates: the sweep of each method.
      select, mode: the validation score and "max" | "min".
      tie_break: a second validation score, lower is better (e.g. the loss), that decides
        between rates with equal `select` (a small validation set ties often); None: the
        smallest such rate.
      extend_at_edge: how many times a method's sweep may grow past its edge: when the best rate
        is the grid's lowest (highest), the rate one step below (above) it runs too — the step
        is the ratio of the edge rate to its neighbour, so ×(1/3, 1, 3) grows to ×1/9 or ×9 —
        and the choice is made again over the grown grid. 0 (the default): the grid as given.
      log, on_result, keep_going, finished_rows: as in `run_grid` (rows keyed by method, seed,
        learning_rate).
    Returns:
      (every row, each tagged `learning_rate` and `chosen` (True on the method's final runs),
       {method: chosen learning rate}).
    """
    if mode not in ("max", "min"):
        raise ValueError(f"sweep_then_seeds: mode must be 'max' or 'min', got {mode!r}.")
    if not seeds:
        raise ValueError("sweep_then_seeds: no seeds given.")
    if isinstance(extend_at_edge, bool) or not isinstance(extend_at_edge, int) or extend_at_edge < 0:
        raise ValueError(f"sweep_then_seeds: extend_at_edge must be an int ≥ 0, got {extend_at_edge!r}.")
    rows = [dict(row) for row in finished_rows]
    done = {(row["method"], row["seed"], row["learning_rate"]) for row in rows}

    def attempt(preset, seed, lr):
        if (preset.name, seed, lr) in done:
            return
        log(f"== {preset.name} seed={seed} lr={lr:g}")
        try:
            row = run_one(preset, seed, lr)
        except Exception:  # noqa: BLE001 - one failing run must not cost the others
            if not keep_going:
                raise
            log(f"!! {preset.name} seed={seed} lr={lr:g} failed:\n{traceback.format_exc()}")
            return
        if seed == seeds[0] and row.get(select) is None:  # a sweep run without its score cannot be ranked
            raise ValueError(f"sweep_then_seeds: the run of {preset.name} (seed {seed}, learning rate {lr:g}) has no "
                             f"{select!r} score; run_one must return it for the sweep's seed.")
        rows.append({**row, "method": preset.name, "seed": seed, "learning_rate": lr, "chosen": False})
        done.add((preset.name, seed, lr))
        mark_chosen(rows, chosen)
        if on_result is not None:
            on_result(rows)

    chosen: dict[str, float] = {}
    sign = 1.0 if mode == "max" else -1.0
    for preset in methods:
        grid = sorted(learning_rates(preset))
        for extensions in range(extend_at_edge + 1):
            for lr in grid:
                attempt(preset, seeds[0], lr)
            swept = [r for r in rows if r["method"] == preset.name and r["seed"] == seeds[0]
                     and r["learning_rate"] in grid and r.get(select) is not None]
            if not swept:
                break
            best = max(swept, key=lambda r: (sign * r[select], -r[tie_break] if tie_break else 0.0, -r["learning_rate"]))
            chosen[preset.name] = best["learning_rate"]
            beyond = edge_extension(grid, best["learning_rate"])
            if extensions == extend_at_edge or beyond is None:
                break
            log(f"   {preset.name}: the best rate {best['learning_rate']:g} is at the grid's edge; adding {beyond:g}")
            grid = sorted([*grid, beyond])
    mark_chosen(rows, chosen)
    if on_result is not None:
        on_result(rows)
    for seed in seeds[1:]:
        for preset in methods:
            if preset.name in chosen:
                attempt(preset, seed, chosen[preset.name])
                mark_chosen(rows, chosen)
    return rows, chosen


def edge_extension(rates: Sequence[float], best: float) -> float | None:
    """The rate one grid step beyond `best` when it is the lowest or highest of `rates` (≥ 2 of them),
    else None. The step is the ratio of the edge rate to its neighbour; 3 significant digits, as
    `learning_rate_grid`."""
    grid = sorted(rates)
    if len(grid) < 2 or best not in (grid[0], grid[-1]):
        return None
    edge, neighbour = (grid[0], grid[1]) if best == grid[0] else (grid[-1], grid[-2])
    return float(f"{edge * edge / neighbour:.3g}")


def mark_chosen(rows: Sequence[dict], chosen: dict[str, float]) -> None:
    """Set each row's `chosen` flag: True where its learning rate is its method's chosen one."""
    for row in rows:
        row["chosen"] = chosen.get(row["method"]) == row["learning_rate"]


def final_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows of each method's chosen learning rate (what `summarise` should see after a sweep)."""
    return [row for row in rows if row.get("chosen")]


def sweep_table(rows: Sequence[dict], select: str = "validation_accuracy", label: str = "validation accuracy", *,
                percent: bool = True, also: str | None = None) -> str:
    """Markdown: one line per method, its swept learning rates with `select`, the chosen one in bold.

    Args:
      percent: show `select` as a percentage (accuracies) or as is (losses).
      also: another score shown in brackets, in % (e.g. validation accuracy beside the loss).
    """
    lines = [f"| method | {label} at each learning rate (first seed; chosen in bold) |", "|---|---|"]
    by_method: dict[str, dict[float, dict]] = {}
    first_seed: dict[str, int] = {}
    for row in rows:
        first_seed.setdefault(row["method"], row["seed"])
        if row["seed"] == first_seed[row["method"]]:
            by_method.setdefault(row["method"], {})[row["learning_rate"]] = row
    for method, by_lr in by_method.items():
        cells = []
        for lr in sorted(by_lr):
            value = by_lr[lr][select]
            text = f"{lr:g}: {100 * value:.2f}" if percent else f"{lr:g}: {value:.3f}"
            if also is not None:
                text += f" ({100 * by_lr[lr][also]:.1f} %)"
            cells.append(f"**{text}**" if by_lr[lr].get("chosen") else text)
        lines.append(f"| {method} | {' · '.join(cells)} |")
    return "\n".join(lines)
