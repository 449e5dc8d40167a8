"""`svft_jax.apply` at model scale: SmolLM2-135M-shaped kernels against a plain LAPACK loop, the
SVDs split over 1..8 (virtual CPU) devices with `mesh=`, and peak host memory of each.

The model: 30 decoder layers of SmolLM2-135M (q, o 576×576; k, v 192×576; gate, up 1536×576;
down 576×1536 as W = out × in: 210 matrices), random float32 weights in HF Flax's (in, out)
kernel layout. Reported:
- time: median wall and process-CPU seconds over `repeats` interleaved runs after one warm-up
  (XLA compiles once per shape), and their ratio to `np.linalg.svd` on each W in a loop;
- memory (`--memory`): each variant in a fresh process, peak resident set (VmHWM) above the
  resident set once the parameters exist, i.e. what the SVDs and the adapted tree add.

    python -m experiments.bench.apply_scale --layers=30 --devices=1,8 --repeats=1 --memory

The virtual devices share this machine's cores, so "wall vs devices" measures the overhead of
splitting (and any core-level parallelism), not a real multi-chip speed-up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

if __name__ == "__main__" and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # before jax is imported

import numpy as np

from experiments.bench import apply as bench_apply
from experiments.bench.apply import llama_stack
from experiments.harness import config as config_lib

SHAPES = {"self_attn/q_proj": (576, 576), "self_attn/k_proj": (576, 192), "self_attn/v_proj": (576, 192),
          "self_attn/o_proj": (576, 576), "mlp/gate_proj": (576, 1536), "mlp/up_proj": (576, 1536),
          "mlp/down_proj": (1536, 576)}  # kernels (in, out)


def smollm_shapes_params(layers: int, seed: int = 0) -> dict:
    """SmolLM2-135M-shaped random kernels, {'model': {'layers': {'0': {...}}}}."""
    return llama_stack(layers, seed, SHAPES)


def lapack_loop(params) -> list:
    """The baseline, keeping every (u, s, vᵀ) as apply keeps its factors."""
    return bench_apply.lapack_loop(params, keep_factors=True)


def variants(params, devices: list[int]) -> dict:
    import jax

    import svft_jax
    from svft_jax import distributed

    table = {"LAPACK loop (np.linalg.svd per matrix)": lambda: lapack_loop(params),
             "apply (host, default)": lambda: svft_jax.apply(params, "banded", d=2)}
    for n in devices:
        mesh = distributed.make_mesh(n, 1, devices=jax.devices()[:n])
        table[f"apply(mesh={n} devices)"] = lambda mesh=mesh: svft_jax.apply(params, "banded", d=2, mesh=mesh)
    if devices:  # factors split over a "model" axis of all the largest mesh's devices, not replicated
        n = max(devices)
        mesh = distributed.make_mesh(1, n, devices=jax.devices()[:n])
        table[f"apply(mesh={n} devices, fsdp=True)"] = lambda: svft_jax.apply(params, "banded", d=2, mesh=mesh, fsdp=True)
    return table


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that over
    from the parent across fork + exec, so a child would report the parent's peak."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")  # pragma: no cover


def peak_memory(name: str, layers: int, devices: list[int]) -> dict:
    """Run one variant in this (fresh) process; peak RSS above the RSS with params built."""
    import jax

    params = smollm_shapes_params(layers)
    table = variants(params, devices)
    jax.block_until_ready(jax.numpy.zeros(1))  # runtime up before the baseline reading
    before = _status_mib("VmRSS")
    result = table[name]()
    jax.block_until_ready(result)
    peak = _status_mib("VmHWM")
    return {"variant": name, "params_mib": sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) / 2**20,
            "peak_above_params_mib": peak - before}


@dataclasses.dataclass(frozen=True)
class Options:
    """layers: decoder layers (7 matrices each); devices: mesh sizes to time; repeats: interleaved
    timed rounds; memory: also measure each variant's peak host memory (fresh processes);
    memory_only: skip the timings; peak_of: internal (one variant's peak, in a child process);
    output: write the markdown here too."""

    layers: int = 30
    devices: tuple[int, ...] = (1, 2, 4, 8)
    repeats: int = 1
    memory: bool = False
    memory_only: bool = False
    peak_of: str | None = None
    output: str | None = None

    def __post_init__(self):
        if self.layers < 1 or self.repeats < 1 or any(n < 1 for n in self.devices):
            raise ValueError(f"bench_apply_scale: --layers, --repeats and --devices must be ≥ 1; got {self}.")


def main(argv=None) -> None:
    (args,) = config_lib.parse(argv, Options(), description=__doc__)
    devices = list(args.devices)
    if args.peak_of is not None:
        print(json.dumps(peak_memory(args.peak_of, args.layers, devices)))
        return

    import jax

    from experiments.harness.bench import machine_description, markdown_table, timed

    params = smollm_shapes_params(args.layers)
    table = variants(params, devices)
    for fn in table.values() if not args.memory_only else ():  # warm-up: compiles every shape once
        jax.block_until_ready(fn())
    results = {name: [(float("nan"), float("nan"))] if args.memory_only else [] for name in table}
    for _ in range(0 if args.memory_only else args.repeats):  # interleaved, so load changes hit every variant alike
        for name, fn in table.items():
            results[name].append(timed(fn, 1))
    medians = {name: (float(np.median([w for w, _ in r])), float(np.median([c for _, c in r]))) for name, r in results.items()}
    base_wall, base_cpu = medians["LAPACK loop (np.linalg.svd per matrix)"]
    memory = {}
    if args.memory or args.memory_only:
        for name in table:
            out = subprocess.run([sys.executable, "-m", "experiments.bench.apply_scale", f"--layers={args.layers}",
                                  f"--devices={','.join(map(str, devices))}", f"--peak_of={name}"], capture_output=True, text=True,
                                 check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
            memory[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_above_params_mib"]
    rows = [[name, f"{wall:.2f}", f"{wall / base_wall:.2f}×", f"{cpu:.2f}", f"{cpu / base_cpu:.2f}×",
             f"{memory[name]:.0f}" if name in memory else "-"] for name, (wall, cpu) in medians.items()]
    factors_mib = sum(4 * (d_in * min(d_in, d_out) + min(d_in, d_out) + d_out * min(d_in, d_out))
                      for d_in, d_out in SHAPES.values()) * args.layers / 2**20
    text = (f"# bench_apply_scale: `svft_jax.apply` on SmolLM2-135M-shaped kernels\n\n{machine_description()}\n"
            f"- {args.layers} layers × 7 kernels = {7 * args.layers} matrices, float32, banded d=2, full rank; "
            f"{args.repeats} interleaved repeat(s) after one warm-up. Factors U, s, V in float32: {factors_mib:.0f} MiB.\n"
            f"- Command: `python -m experiments.bench.apply_scale --layers={args.layers} "
            f"--devices={','.join(map(str, devices))} --repeats={args.repeats}{' --memory' if args.memory else ''}`\n\n"
            + markdown_table(["variant", "wall s", "wall / LAPACK", "CPU s", "CPU / LAPACK", "peak host MiB above params"], rows)
            + "\n")
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
