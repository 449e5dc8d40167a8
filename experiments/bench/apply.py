"""How long `svft_jax.apply` takes on a Llama-shaped stack, against a plain LAPACK loop.

The stack: `layers` decoder layers of hidden 512 and MLP width 1376 (q/k/v/o 512×512,
gate/up 512→1376, down 1376→512), Dense (in, out) kernels in HF Flax Llama's param layout.
Reported per variant: median wall time and median process CPU time over `repeats`
interleaved runs, and their ratio to `np.linalg.svd` called on each matrix in a loop.

    python -m experiments.bench.apply --layers 8 --repeats 3
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np

import svft_jax
from experiments.harness import config as config_lib
from experiments.harness.bench import machine_description, markdown_table, timed

SHAPES = {"self_attn/q_proj": (512, 512), "self_attn/k_proj": (512, 512), "self_attn/v_proj": (512, 512),
          "self_attn/o_proj": (512, 512), "mlp/gate_proj": (512, 1376), "mlp/up_proj": (512, 1376),
          "mlp/down_proj": (1376, 512)}


def llama_stack(layers: int, seed: int = 0, shapes: dict | None = None) -> dict:
    """{'model': {'layers': {'0': {'self_attn': {'q_proj': {'kernel': (in, out)}}, ...}}}}.

    shapes: {"group/proj": kernel (in, out)} per layer (default: this benchmark's `SHAPES`).
    """
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for layer in range(layers):
        for name, shape in (SHAPES if shapes is None else shapes).items():
            group, proj = name.split("/")
            node = tree.setdefault(str(layer), {}).setdefault(group, {}).setdefault(proj, {})
            node["kernel"] = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
    return {"model": {"layers": tree}}


def lapack_loop(params, keep_factors: bool = False) -> list:
    """The baseline: np.linalg.svd (LAPACK gesdd) of each W = kernelᵀ, one at a time; keeps the
    singular values, or every (u, s, vᵀ) with `keep_factors` (a fair peak-memory baseline)."""
    out = []
    for layer in params["model"]["layers"].values():
        for group in layer.values():
            for proj in group.values():
                factors = np.linalg.svd(proj["kernel"].T, full_matrices=False)
                out.append(factors if keep_factors else factors[1])
    return out


@dataclasses.dataclass(frozen=True)
class Options:
    """layers: decoder layers of the stack; repeats: interleaved timed runs; output: the .md."""

    layers: int = 8
    repeats: int = 3
    output: str = "experiments/results/bench_apply.md"


def main(argv=None) -> None:
    (args,) = config_lib.parse(argv, Options(), description=__doc__)
    params = llama_stack(args.layers)
    variants = {
        "LAPACK loop (np.linalg.svd per matrix)": lambda: lapack_loop(params),
        'apply(svd_backend="auto") [default]': lambda: svft_jax.apply(params, "banded", d=2),
        'apply(svd_backend="numpy")': lambda: svft_jax.apply(params, "banded", d=2, svd_backend="numpy"),
        'apply(svd_backend="jax")': lambda: svft_jax.apply(params, "banded", d=2, svd_backend="jax"),
        'apply(rank=64, svd_backend="auto")': lambda: svft_jax.apply(params, "banded", d=2, rank=64),
        'apply(rank=64, svd_backend="randomized")': lambda: svft_jax.apply(params, "banded", d=2, rank=64, svd_backend="randomized"),
    }
    for fn in variants.values():  # compile / warm caches once
        fn()
    results = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for name, fn in variants.items():
            results[name].append(timed(fn, 1))
    medians = {name: (float(np.median([w for w, _ in r])), float(np.median([c for _, c in r]))) for name, r in results.items()}
    base_wall, base_cpu = medians["LAPACK loop (np.linalg.svd per matrix)"]
    rows = [[name, f"{wall:.2f}", f"{wall / base_wall:.2f}×", f"{cpu:.2f}", f"{cpu / base_cpu:.2f}×"]
            for name, (wall, cpu) in medians.items()]
    table = markdown_table(["variant", "wall s (median)", "wall / LAPACK", "CPU s (median)", "CPU / LAPACK"], rows)
    matrices = args.layers * len(SHAPES)
    text = (f"# bench_apply: SVD at `svft_jax.apply` on a Llama-shaped stack\n\n{machine_description()}\n"
            f"- {args.layers} layers × 7 kernels = {matrices} matrices (512×512 ×4, 512×1376 ×3 per layer), "
            f"float32; banded d=2; {args.repeats} interleaved repeats after one warm-up; "
            f'"auto" is LAPACK (numpy) on CPU, XLA\'s SVD on an accelerator; this run: {jax.default_backend()}.\n'
            f"- Command: `python -m experiments.bench.apply --layers {args.layers} --repeats {args.repeats}`\n\n"
            f"{table}\n")
    pathlib.Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
