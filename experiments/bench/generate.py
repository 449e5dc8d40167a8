"""Decoding speed of SmolLM2-135M-Instruct (`svft_jax.models.generate`) against this box's bounds.

Greedy KV-cache decoding of `new_tokens` tokens after a `prompt_tokens`-token prompt (no stop
token, so every call decodes them all), at batch 1 and 8, given
  merged         `svft_jax.merge(adapted)` (the base model's speed: merging done beforehand),
  adapted, new M the adapted tree (SVFT^B d=2 on all seven projections of all 30 layers) with
                 new arrays each call (as after each training step): `generate` merges it, by
                 its own jitted program, then decodes exactly as for merged params;
  adapted, same  the same adapted tree passed again (an evaluation over many batches):
                 `generate` reuses its last merge.
tokens/s = batch × new_tokens ÷ the median wall time of a whole `generate` call (prefill and,
for a new M, the merge included).

The bounds beside them are measured here, not quoted:
  bandwidth  every decoding step reads every weight once (the tied embedding too, for the
             logits): tokens/s ≤ batch × bandwidth ÷ weight bytes, bandwidth = the best of a
             large array copy (bytes read + written) and a large sum (bytes read), in XLA;
             the KV cache (a few % of the weights here) is left out, so the bound is loose.
  compute    2 FLOPs per weight per token: tokens/s ≤ matmul FLOP/s ÷ (2 × parameters), the
             FLOP/s of a large square float32 matmul.

    python -m experiments.bench.generate [--new_tokens=64] [--repeats=3] [--pause=<pgrep pattern>]
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import svft_jax
from experiments.harness import config as config_lib
from experiments.harness.bench import machine_description, markdown_table, paused
from experiments.harness.train import keep_freed_memory

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"


@dataclasses.dataclass(frozen=True)
class Options:
    """batches: decoding batch sizes; new_tokens: tokens decoded per call; prompt_tokens: prompt
    length; repeats: timed calls per case (median); pause: `pgrep -f` pattern of other jobs to
    stop while timing ('' = none); output: results prefix ('' = none)."""

    batches: tuple[int, ...] = (1, 8)
    new_tokens: int = 64
    prompt_tokens: int = 16
    repeats: int = 3
    pause: str = ""
    output: str = str(RESULTS / "bench_generate")


def _best_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - tic)
    return min(times)


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """Bytes/s of a large float32 copy (read + written) and a large sum (read), in XLA."""
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    nbytes = x.size * 4
    copy = jax.jit(lambda a: a + 1.0)
    total = jax.jit(jnp.sum)
    return {"copy": 2 * nbytes / _best_seconds(lambda: copy(x), repeats),
            "read": nbytes / _best_seconds(lambda: total(x), repeats)}


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    product = jax.jit(lambda a: a @ a)
    return 2 * n**3 / _best_seconds(lambda: product(a), repeats)


def main(argv=None):
    keep_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    (options,) = config_lib.parse(argv, Options(), description=__doc__)
    from experiments.bench.llm_step import TARGETS, factor_store
    from svft_jax.models import generate, generation

    start = time.perf_counter()
    header = machine_description()
    model, params = svft_jax.models.load_gguf(svft_jax.models.smollm2_path())
    adapted = svft_jax.apply(params, "banded", d=2, targets=TARGETS, factors=factor_store(params))
    merged = svft_jax.merge(adapted)
    train, frozen = svft_jax.split(adapted)

    def fresh_m():
        """The adapted tree with new M arrays (same values): what a training loop passes."""
        return svft_jax.combine(jax.tree.map(jnp.copy, train), frozen)

    parameters = sum(x.size for x in jax.tree.leaves(params))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    del params
    rng = np.random.default_rng(0)
    rows, results = [], {}
    # One short pause per measurement (compiles run unpaused), not one over the whole bench.
    with paused(options.pause):
        bandwidth = memory_bandwidth()
        flops = matmul_flops()
    best_bandwidth = max(bandwidth.values())
    with paused(options.pause):
        merge_s = _best_seconds(lambda: generation._merged(adapted), options.repeats)
    for batch in options.batches:
        prompts = rng.integers(0, model.config.vocab_size, (batch, options.prompt_tokens)).astype(np.int32)
        bound = batch * best_bandwidth / weight_bytes
        compute_bound = flops / (2 * parameters)
        for kind, make_tree in (("merged", lambda: merged), ("adapted, new M", fresh_m), ("adapted, same", lambda: adapted)):
            def call(tree, prompts=prompts):
                return generate(model, tree, prompts, max_new_tokens=options.new_tokens, stop_token_id=()).tokens

            call(make_tree())  # compile
            times = []
            with paused(options.pause):
                for _ in range(options.repeats):
                    tree = make_tree()  # outside the timed call
                    jax.block_until_ready(tree)
                    tic = time.perf_counter()
                    call(tree)
                    times.append(time.perf_counter() - tic)
            seconds = statistics.median(times)
            rate = batch * options.new_tokens / seconds
            results[f"{kind}-{batch}"] = {"seconds": seconds, "tokens_per_s": rate, "bound": bound,
                                          "compute_bound": compute_bound}
            rows.append([batch, kind, f"{rate:.1f}", f"{seconds:.2f}",
                         f"{merge_s:.2f}" if kind == "adapted, new M" else "—", f"{bound:.0f}", f"{bound / rate:.2f}",
                         f"{compute_bound:.0f}"])
            print(f"batch {batch} {kind}: {rate:.1f} tokens/s (bandwidth bound {bound:.0f})", flush=True)
    table = markdown_table(["batch", "params", "tokens/s", "s per call", "merge s (in the call)",
                            "bandwidth bound tokens/s", "bound ÷ measured", "compute bound tokens/s"], rows)
    command = " ".join(["python -m experiments.bench.generate", *argv])
    text = [f"# bench_generate: SmolLM2-135M-Instruct, greedy, {options.prompt_tokens}-token prompt, "
            f"{options.new_tokens} new tokens", "", header,
            f"- Command: `{command}` (total {time.perf_counter() - start:.0f} s)",
            f"- Weights: {parameters:,} float32 parameters = {weight_bytes / 2**20:.0f} MiB read per decoding step.",
            f"- Measured memory bandwidth: copy {bandwidth['copy'] / 1e9:.1f} GB/s (read + written), "
            f"sum {bandwidth['read'] / 1e9:.1f} GB/s (read); the bound uses {best_bandwidth / 1e9:.1f} GB/s. "
            f"Matmul: {flops / 1e9:.0f} GFLOP/s (2048² float32).",
            f"- adapted: SVFT^B d=2 on q, k, v, o, gate, up, down of all 30 layers. With a new M `generate` merges "
            f"it ({merge_s:.2f} s here, measured alone) and runs the merged params' decoding program; the same "
            f"tree passed again reuses that merge.",
            f"- Median of {options.repeats} calls after a compiling one; other jobs matching "
            f"`{options.pause or '(none)'}` were paused while timing (one pause per measurement, compiles unpaused).", "", table, ""]
    print("\n".join(text))
    if options.output:
        pathlib.Path(options.output + ".md").write_text("\n".join(text))
        pathlib.Path(options.output + ".json").write_text(json.dumps(
            {"command": command, "results": results, "bandwidth": bandwidth, "matmul_flops": flops,
             "merge_s": merge_s, "weight_bytes": weight_bytes, "machine": header}, indent=1))


if __name__ == "__main__":
    main()
