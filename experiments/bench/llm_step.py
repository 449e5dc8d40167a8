"""SVFT's training-step cost on a real LLM: SmolLM2-135M-Instruct, against full FT and LoRA.

SmolLM2-135M-Instruct (the offline GGUF, `svft_jax.models.smollm2_path()`: Llama, 30 layers,
hidden 576, MLP 1536, 9 query / 3 KV heads, tied 49,152-token embedding), the causal LM loss
on every position of batch 8 × 64 tokens, AdamW (the harness's `make_optimizer`), adapters on
all seven projections (q, k, v, o, gate, up, down) of all 30 layers (210 kernels), the model
run through `svft_jax.wrap(model, "auto", strict=True)` (the harness's path,
`experiments.harness.models.run_adapted`). Methods: full fine-tuning (every weight, the tied
embedding included), LoRA r=8 (α = 16), SVFT^P and SVFT^B d=2, plus the variants this
benchmark exists to compare (see `VARIANTS`).

Each method is measured twice:
  alone        in a fresh process of its own (`--mode=alone`): compile, one warm-up step, then
               `steps` steps; the median wall time, and per step the user and system CPU
               seconds and minor page faults (`getrusage`); the peak resident memory while
               stepping (VmHWM, reset after set-up) and the resident memory after.
  interleaved  every method in one process (`--mode=interleaved`), one step of each per
               round for `rounds` rounds, so load on the shared machine hits them alike.
XLA peak = the compiled step's memory analysis: temp + arguments + outputs − aliased bytes,
what the step needs resident (frozen weights included), not a measured RSS.

    python -m experiments.bench.llm_step                             # alone, then interleaved -> results
    python -m experiments.bench.llm_step --mode=alone --methods=svft_banded_d2 --steps=6
    python -m experiments.bench.llm_step --methods=full_ft,lora_r8,svft_banded_d2_noW0 --rounds=5

SVFT's factors are computed once and cached in experiments/runs/ (a factor file, reused by
every method and process).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import svft_jax
from experiments.harness import config as config_lib
from experiments.harness import models, presets
from experiments.harness.bench import machine_description, markdown_table, paused
from experiments.harness.train import (
    TrainConfig,
    keep_freed_memory,
    make_optimizer,
    release_freed_memory,
)
from svft_jax.training import losses, train_step_fn

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"
RUNS = pathlib.Path(__file__).resolve().parents[1] / "runs"
FACTOR_CACHE = RUNS / "smollm2_factors.safetensors"
BATCH, SEQUENCE = 8, 64
TARGETS = r".*layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One measured configuration: a preset, `apply` options and how the step is built.

    Attributes:
      preset: an `experiments.harness.presets` name.
      options: extra keywords of the adapter's `apply` (e.g. keep_base=False).
      donate: donate the trainable state and optimiser state to the step (the harness does).
      env: environment variables of the process that measures it alone (allocator settings);
        an interleaved run measures only variants without one.
      compiler_options: XLA options of this step's compilation (`.compile(compiler_options=)`).
      note: what the variant tests.
    """

    preset: str
    options: tuple = ()
    donate: bool = True
    env: tuple = ()
    compiler_options: tuple = ()
    note: str = ""


# glibc's malloc asks for transparent huge pages on the blocks it maps (fewer, larger faults).
_HUGE_PAGES = (("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1"),)
_MEMORY_SCHEDULER = (("xla_cpu_enable_concurrency_optimized_scheduler", False),)

VARIANTS = {
    "full_ft": Variant("full_ft", note="every weight trains"),
    "lora_r8": Variant("lora_r8", note="LoRA r=8, α=16"),
    "svft_plain": Variant("svft_plain", note="SVFT^P, W0 kept (apply's default)"),
    "svft_banded_d2": Variant("svft_banded_d2", note="SVFT^B d=2, W0 kept (apply's default)"),
    "svft_banded_d2_noW0": Variant("svft_banded_d2", (("keep_base", False),),
                                   note="SVFT^B d=2 without W0 (`keep_base=False`, `drop_unused_base`)"),
    "svft_plain_noW0": Variant("svft_plain", (("keep_base", False),), note="SVFT^P without W0"),
    "svft_banded_d2_nodonate": Variant("svft_banded_d2", donate=False, note="SVFT^B d=2, no buffer donation"),
    "lora_r8_nodonate": Variant("lora_r8", donate=False, note="LoRA r=8, no buffer donation"),
    "svft_banded_d2_thp": Variant("svft_banded_d2", env=_HUGE_PAGES, note="SVFT^B d=2, malloc asks for huge pages"),
    "svft_banded_d2_memsched": Variant("svft_banded_d2", compiler_options=_MEMORY_SCHEDULER,
                                       note="SVFT^B d=2, XLA:CPU's memory-first scheduler"),
    "lora_r8_memsched": Variant("lora_r8", compiler_options=_MEMORY_SCHEDULER, note="LoRA r=8, XLA:CPU's memory-first scheduler"),
}
DEFAULT_METHODS = ("full_ft", "lora_r8", "svft_plain", "svft_banded_d2")


@dataclasses.dataclass(frozen=True)
class Options:
    """mode: 'both' (alone, then interleaved), 'alone' or 'interleaved'; methods: `VARIANTS`
    names; steps: timed steps alone; passes: processes per method alone, run in turn (the one
    with the lower median is kept: load on a shared machine only slows); rounds: interleaved
    rounds; allocator: 'keep' (the
    harness's `experiments.harness.train.keep_freed_memory`) or 'default' (glibc's own settings);
    pause: a `pgrep -f` pattern of other jobs on a shared machine to stop (SIGSTOP) while steps
    are timed and resume (SIGCONT) right after, also on failure ('' = none); output: results
    prefix ('' = none)."""

    mode: str = "both"
    methods: tuple[str, ...] = DEFAULT_METHODS
    steps: int = 6
    rounds: int = 5
    passes: int = 2
    allocator: str = "keep"
    pause: str = ""
    output: str = str(RESULTS / "bench_llm_step")
    child: bool = False  # internal: one method alone, print a JSON line

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in VARIANTS]
        if (unknown or self.mode not in ("both", "alone", "interleaved") or self.steps < 1 or self.rounds < 1
                or self.allocator not in ("keep", "default")):
            raise ValueError(f"bench_llm_step: --mode both|alone|interleaved, --methods from {sorted(VARIANTS)}, "
                             f"--steps/--rounds ≥ 1, --allocator keep|default; got {self} (unknown: {unknown}).")


# ----------------------------------------------------------------------------- set-up


ALLOCATORS = {"keep": "malloc keeps freed memory (`experiments.harness.train.keep_freed_memory`, the harness's setting)",
              "default": "glibc's defaults (each step's XLA scratch is mmapped and unmapped anew)"}


def _compilation_cache() -> None:
    """JAX's persistent compilation cache in experiments/runs/ (a timing run recompiles nothing)."""
    jax.config.update("jax_compilation_cache_dir", str(RUNS / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def load_model():
    """(tied causal LM, float32 params) of SmolLM2 from the offline GGUF."""
    return svft_jax.models.load_gguf(svft_jax.models.smollm2_path())


def factor_store(params):
    """The SVD factors of the 210 target kernels: from the cache file, or computed and cached."""
    from svft_jax import checkpoint

    if FACTOR_CACHE.exists():
        return checkpoint.FactorFile(FACTOR_CACHE)
    store: dict = {}
    svft_jax.apply(params, "plain", targets=TARGETS, factors=store)
    RUNS.mkdir(parents=True, exist_ok=True)
    checkpoint.save_factor_cache(FACTOR_CACHE, store, overwrite=True)
    return store


def adapt(variant: Variant, params, factors):
    preset = presets.get(variant.preset)
    options = dict(variant.options)
    if preset.method == "svft":
        options["factors"] = factors
    return preset.adapt(params, targets=None if preset.method == "full" else TARGETS, seed=0, **options)


def batch_of(vocab: int) -> dict:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(0, vocab, (BATCH, SEQUENCE), dtype=np.int32)}


def build_step(variant: Variant, model, adapted, batch):
    """(compiled step, trainable, frozen, opt_state, memory analysis dict, compile seconds)."""
    preset = presets.get(variant.preset)
    run_model = models.run_adapted(model)

    def loss_fn(adapted, batch, rng):
        del rng
        logits = run_model(batch["input_ids"], params=adapted).logits
        return losses.causal_lm_loss(logits, batch["input_ids"])

    config = TrainConfig(steps=1000, learning_rate=preset.learning_rate, warmup_fraction=0.0)
    tx, _ = make_optimizer(config, full_finetune=preset.full_finetune)
    trainable, frozen = svft_jax.split(adapted, extra=".*" if preset.full_finetune else None)
    trainable = jax.tree.map(jnp.array, trainable)  # own copies: the step donates them
    opt_state = tx.init(trainable)
    step = jax.jit(train_step_fn(loss_fn, tx), donate_argnums=(0, 2) if variant.donate else ())
    rng = jax.random.key(0)
    tic = time.perf_counter()
    compiled = step.lower(trainable, frozen, opt_state, batch, rng).compile(
        compiler_options=dict(variant.compiler_options) or None)
    compile_s = time.perf_counter() - tic
    stats = compiled.memory_analysis()
    memory = {"temp": stats.temp_size_in_bytes, "arguments": stats.argument_size_in_bytes,
              "outputs": stats.output_size_in_bytes, "aliased": stats.alias_size_in_bytes}
    memory["peak"] = memory["temp"] + memory["arguments"] + memory["outputs"] - memory["aliased"]
    plan = {}
    if preset.method not in ("full", "head"):
        plan_of = run_model.plan(batch["input_ids"], params=adapted)
        for used in plan_of.values():
            for name in used:
                plan[name] = plan.get(name, 0) + 1
    state = {"compiled": compiled, "trainable": trainable, "frozen": frozen, "opt_state": opt_state, "rng": rng,
             "times": [], "user": [], "system": [], "faults": []}
    return state, memory, compile_s, plan, sum(x.size for x in jax.tree.leaves(trainable))


def one_step(state, batch):
    """Run one step; record wall, user/system CPU seconds and minor faults."""
    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    state["trainable"], state["opt_state"], metrics = state["compiled"](
        state["trainable"], state["frozen"], state["opt_state"], batch, state["rng"])
    jax.block_until_ready(metrics["loss"])
    after = resource.getrusage(resource.RUSAGE_SELF)
    state["times"].append(time.perf_counter() - wall)
    state["user"].append(after.ru_utime - before.ru_utime)
    state["system"].append(after.ru_stime - before.ru_stime)
    state["faults"].append(after.ru_minflt - before.ru_minflt)
    return float(metrics["loss"])


def _resident() -> dict:
    """{current, peak} resident MiB of this process (VmRSS, VmHWM)."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values["current" if line.startswith("VmRSS") else "peak"] = int(line.split()[1]) / 1024
    return values


def _reset_peak_resident() -> None:
    with open("/proc/self/clear_refs", "w") as handle:  # "5": reset VmHWM to the current RSS
        handle.write("5")


def summary(state) -> dict:
    return {"step_s": statistics.median(state["times"]), "user_s": statistics.median(state["user"]),
            "system_s": statistics.median(state["system"]), "minor_faults": int(statistics.median(state["faults"])),
            "steps": len(state["times"])}


# ----------------------------------------------------------------------------- the two modes


def measure_alone(name: str, steps: int, pause: str = "") -> dict:
    """One method in this process: set-up, compile, warm-up, `steps` timed steps."""
    variant = VARIANTS[name]
    model, params = load_model()
    factors = factor_store(params) if presets.get(variant.preset).method == "svft" else None
    adapted = adapt(variant, params, factors)
    del params, factors
    batch = batch_of(model.config.vocab_size)
    state, memory, compile_s, plan, trainable = build_step(variant, model, adapted, batch)
    del adapted
    import gc

    gc.collect()
    release_freed_memory()
    resident_before = _resident()["current"]
    _reset_peak_resident()
    with paused(pause):
        first_loss = one_step(state, batch)  # warm-up (its faults and resident memory count too)
        state.update(times=[], user=[], system=[], faults=[])
        for _ in range(steps):
            one_step(state, batch)
    resident = _resident()
    held = sum(x.nbytes for x in jax.live_arrays()) / 2**20
    return {"method": name, **summary(state), "memory": memory, "compile_s": compile_s, "plan": plan, "arrays_mib": held,
            "trainable": trainable, "first_loss": first_loss, "resident_before_mib": resident_before,
            "resident_mib": resident["current"], "resident_peak_mib": resident["peak"],
            "env": dict(variant.env)}


def run_alone_in_subprocess(name: str, steps: int, allocator: str, pause: str) -> dict:
    env = {**os.environ, **dict(VARIANTS[name].env)}
    command = [sys.executable, "-m", "experiments.bench.llm_step", "--child=true", "--mode=alone",
               f"--methods={name}", f"--steps={steps}", f"--allocator={allocator}", f"--pause={pause}"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"bench_llm_step: {name} alone failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def measure_interleaved(names, rounds: int, pause: str = "") -> dict:
    model, params = load_model()
    needs_factors = any(presets.get(VARIANTS[n].preset).method == "svft" for n in names)
    factors = factor_store(params) if needs_factors else None
    batch = batch_of(model.config.vocab_size)
    states, results = {}, {}
    for name in names:
        variant = VARIANTS[name]
        state, memory, compile_s, plan, trainable = build_step(variant, model, adapt(variant, params, factors), batch)
        one_step(state, batch)  # warm-up
        state.update(times=[], user=[], system=[], faults=[])
        states[name] = state
        results[name] = {"method": name, "memory": memory, "compile_s": compile_s, "plan": plan, "trainable": trainable}
        print(f"compiled {name}: {compile_s:.0f}s", file=sys.stderr, flush=True)
    del params, factors
    with paused(pause):
        for _ in range(rounds):
            for state in states.values():
                one_step(state, batch)
    for name, state in states.items():
        results[name].update(summary(state))
    return {"methods": results, "resident_mib": _resident()["current"]}


# ----------------------------------------------------------------------------- report


def _ratio(values: dict, name: str, reference: str, key) -> str:
    if reference not in values or name not in values:
        return "—"
    return f"{key(values[name]) / key(values[reference]):.2f}"


def table(results: dict, *, alone: bool) -> str:
    step, peak = (lambda r: r["step_s"]), (lambda r: r["memory"]["peak"])
    cpu = lambda r: r["user_s"] + r["system_s"]  # noqa: E731
    header = ["method", "trainable", "plan", "step s", "÷ LoRA8", "÷ FT", "user + sys s", "CPU ÷ LoRA8", "CPU ÷ FT",
              "minor faults", "XLA peak MiB (temp)", "peak ÷ LoRA8"]
    if alone:
        header += ["arrays held MiB", "RSS peak MiB", "RSS ÷ LoRA8"]
    rows = []
    for name, r in results.items():
        plan = ", ".join(f"{k} {v}" for k, v in r["plan"].items()) or "—"
        row = [name, f"{r['trainable']:,}", plan, f"{r['step_s']:.2f}", _ratio(results, name, "lora_r8", step),
               _ratio(results, name, "full_ft", step), f"{r['user_s']:.2f} + {r['system_s']:.2f}",
               _ratio(results, name, "lora_r8", cpu), _ratio(results, name, "full_ft", cpu),
               f"{r['minor_faults']:,}", f"{r['memory']['peak'] / 2**20:.0f} ({r['memory']['temp'] / 2**20:.0f})",
               _ratio(results, name, "lora_r8", peak)]
        if alone:
            row += [f"{r.get('arrays_mib', float('nan')):.0f}", f"{r['resident_peak_mib']:.0f}",
                    _ratio(results, name, "lora_r8", lambda x: x["resident_peak_mib"])]
        rows.append(row)
    return markdown_table(header, rows)


def targets(results: dict, label: str) -> list[str]:
    """The issue's targets for SVFT^B d=2 (wrap auto), checked on one set of results."""
    if not {"svft_banded_d2", "lora_r8", "full_ft"} <= set(results):
        return []
    svft, lora, full = results["svft_banded_d2"], results["lora_r8"], results["full_ft"]
    def cpu(r):
        return r["user_s"] + r["system_s"]

    checks = [("step time ÷ LoRA r=8", svft["step_s"] / lora["step_s"], 1.0, f"; CPU {cpu(svft) / cpu(lora):.2f}"),
              ("step time ÷ full FT", svft["step_s"] / full["step_s"], 0.9, f"; CPU {cpu(svft) / cpu(full):.2f}"),
              ("XLA peak ÷ LoRA r=8", svft["memory"]["peak"] / lora["memory"]["peak"], 1.2, "")]
    return [f"- {label}: SVFT^B d=2 {name} = {value:.2f} (target ≤ {limit}: {'met' if value <= limit else 'NOT met'}{extra})"
            for name, value, limit, extra in checks]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    (options,) = config_lib.parse(argv, Options(), description=__doc__)
    if options.allocator == "keep":
        keep_freed_memory()  # before JAX starts its threads
    _compilation_cache()
    if options.child:
        print(json.dumps(measure_alone(options.methods[0], options.steps, options.pause)), flush=True)
        return
    start = time.perf_counter()
    header = machine_description()
    alone, interleaved = {}, None
    if options.mode in ("both", "alone"):
        for attempt in range(options.passes):
            for name in options.methods:
                r = run_alone_in_subprocess(name, options.steps, options.allocator, options.pause)
                print(f"{name} alone (pass {attempt + 1}): {r['step_s']:.2f}s/step, user {r['user_s']:.2f}s, "
                      f"sys {r['system_s']:.2f}s, {r['minor_faults']:,} faults, XLA peak {r['memory']['peak'] / 2**20:.0f} MiB, "
                      f"resident {r['resident_peak_mib']:.0f} MiB", flush=True)
                if name not in alone or r["step_s"] < alone[name]["step_s"]:
                    alone[name] = r
    if options.mode in ("both", "interleaved"):
        interleaved = measure_interleaved([m for m in options.methods if not VARIANTS[m].env], options.rounds,
                                          options.pause)
    command = " ".join(["python -m experiments.bench.llm_step", *argv])
    text = [f"# bench_llm_step: SmolLM2-135M-Instruct, batch {BATCH} × {SEQUENCE} tokens, AdamW", "",
            header, f"- Command: `{command}` (total {time.perf_counter() - start:.0f} s)",
            f"- Execution path: `{models.EXECUTION}` (`experiments.harness.models.run_adapted`); full FT runs the plain model.",
            f"- Allocator: {ALLOCATORS[options.allocator]}",
            "- plan: how many of the 210 target kernels ran each strategy.", ""]
    if alone:
        text += [f"## Each method alone (own process, median of {options.steps} steps; the better of {options.passes} "
                 "processes per method, run in turn)", "", table(alone, alone=True), "",
                 "Alone, each process meets the shared machine at another moment: its wall time says how loaded "
                 "the machine was then as much as what the method costs; compare methods by the CPU columns here "
                 "and by wall time in the interleaved table. arrays held: the JAX arrays the process holds while "
                 "stepping (weights, W0 included where kept, factors, optimiser state); RSS peak: VmHWM over the "
                 "timed steps, reset after set-up and `malloc_trim` (with the kept heap it also counts "
                 "fragmentation).", ""]
    if interleaved:
        text += [f"## Interleaved (one process, {options.rounds} rounds of one step each; resident "
                 f"{interleaved['resident_mib']:.0f} MiB at the end)", "", table(interleaved["methods"], alone=False), ""]
    checks = targets(alone, "alone") + (targets(interleaved["methods"], "interleaved") if interleaved else [])
    if checks:
        text += ["## Targets", "", *checks, ""]
    text += ["Notes: " + "; ".join(f"{name}: {VARIANTS[name].note}" for name in options.methods),
             f"Timed steps paused other jobs matching `{options.pause or '(none)'}`; load average at the end: "
             f"{os.getloadavg()[0]:.1f}.", ""]
    print("\n".join(text))
    if options.output:
        pathlib.Path(options.output + ".md").write_text("\n".join(text))
        pathlib.Path(options.output + ".json").write_text(json.dumps(
            {"command": command, "alone": alone, "interleaved": interleaved, "machine": header}, indent=1))


if __name__ == "__main__":
    main()
