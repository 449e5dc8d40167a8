"""One layer's training step under every execution strategy, side by side, with FLOP floors and
peak memory.

    python -m experiments.bench_layers                      # T = 1024, the five shapes
    python -m experiments.bench_layers --tokens 256 4096 --shapes 384x384 1536x384 384x1536 768x768

A step is forward + backward + Adam for one layer y = x Wᵀ (W: out × in) over T tokens, with the
layer-input gradient on (as inside a network): `dense` trains W itself (full fine-tuning);
`svft-*` is SVFT^B d=2 at full rank run by `svft_jax.wrap(fn, strategy)`; `lora` is LoRA r=8
(factored). Per row: median wall ms; ÷ dense; the multiply-add count of the strategy's cost model
(`svft_jax.strategies.step_flops`) ÷ dense's 3·T·d1·d2 (the FLOP floor ratio); time ÷ floor
(1.00 = as fast per FLOP as the dense step); the XLA compiled memory (arguments + temporaries,
`compiled.memory_analysis()`).

W0 is kept only where the strategy reads it: `svft-factored` keeps it (x W0ᵀ), the others
run on `svft_jax.strategies.drop_unused_base(adapted)` (full rank: W0 = U Σ Vᵀ).
Uses only the public API.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import svft_jax  # noqa: E402
from svft_jax import baselines  # noqa: E402
from experiments._bench_common import machine_description, markdown_table, timed  # noqa: E402
from svft_jax.strategies import drop_unused_base, step_flops, wrap  # noqa: E402

SHAPES = ("384x384", "1536x384", "384x1536", "768x768", "2048x2048")  # out × in
STRATEGIES = ("rebuild", "factored", "spectral", "auto", "reference")


def _layer(params, x):
    return x @ params["layer"]["kernel"]  # flax layout: kernel (in, out)


def _step_fn(loss_of, tx):
    """jit((trainable, opt_state, frozen, x, c) -> (trainable, opt_state, dx)): one Adam step."""

    def step(trainable, opt_state, frozen, x, cotangent):
        def loss(t, x):
            return jnp.vdot(loss_of(t, frozen, x), cotangent)

        grads, dx = jax.grad(loss, argnums=(0, 1))(trainable, x)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, dx

    return jax.jit(step)


def _memory_mib(compiled) -> float:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return float("nan")
    return (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes) / 2**20


def _run(name, trainable, frozen, loss_of, x, cotangent, repeats):
    tx = svft_jax.optimizer(optax.adam(1e-3)) if frozen is not None else optax.adam(1e-3)
    opt_state = tx.init(trainable)
    step = _step_fn(loss_of, tx)
    args = (trainable, opt_state, frozen, x, cotangent)
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))  # warm-up
    wall, _ = timed(lambda: compiled(*args), repeats)
    return wall, _memory_mib(compiled), compile_s


def bench_shape(d_out: int, d_in: int, tokens: int, repeats: int, strategies) -> list[list]:
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), jnp.float32)
    params = {"layer": {"kernel": kernel}}
    x = jnp.asarray(rng.standard_normal((tokens, d_in)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((tokens, d_out)), jnp.float32)
    r = min(d_in, d_out)
    dense_flops = 3 * tokens * d_out * d_in
    rows = []

    dense_ms, dense_mem, _ = _run("dense", params, None, lambda t, f, x: _layer(t, x), x, cotangent, repeats)
    dense_ms *= 1e3
    rows.append(["dense FT", f"{dense_ms:.1f}", "1.00", "1.00", "1.00", f"{dense_mem:.1f}"])

    adapted = svft_jax.apply(params, "banded", d=2, svd_backend="numpy")
    dropped = drop_unused_base(adapted)
    entries = svft_jax.banded_count(r, 2)
    for strategy in strategies:
        tree = adapted if strategy == "factored" else dropped
        has_base = strategy == "factored"
        trainable, frozen = svft_jax.split(tree)
        run = wrap(_layer, strategy)
        ms, mem, _ = _run(strategy, trainable, frozen, lambda t, f, x, run=run: run(svft_jax.combine(t, f), x), x, cotangent, repeats)
        ms *= 1e3
        chosen = "+".join(sorted(set().union(*map(set, run.last_plan.values()))))
        costs = step_flops(d_out, d_in, r, tokens, has_base=has_base, entries=entries)
        floor_key = {"reference": "rebuild"}.get(strategy, chosen if strategy == "auto" else strategy)
        floor = costs.get(floor_key, float("nan")) / dense_flops
        if strategy == "reference":  # rebuilds W every use: same count as rebuild
            floor = costs["rebuild"] / dense_flops
        label = f"svft-{strategy}" + (f" (→ {chosen})" if strategy == "auto" else "")
        rows.append([label, f"{ms:.1f}", f"{ms / dense_ms:.2f}", f"{floor:.2f}", f"{ms / dense_ms / floor:.2f}", f"{mem:.1f}"])

    lora = baselines.lora.apply(params, rank=8)
    trainable, frozen = svft_jax.split(lora)
    run = wrap(_layer, "factored")
    ms, mem, _ = _run("lora", trainable, frozen, lambda t, f, x: run(svft_jax.combine(t, f), x), x, cotangent, repeats)
    ms *= 1e3
    lora_floor = step_flops(d_out, d_in, 8, tokens)["factored"] / dense_flops
    rows.append(["lora r=8 (factored)", f"{ms:.1f}", f"{ms / dense_ms:.2f}", f"{lora_floor:.2f}", f"{ms / dense_ms / lora_floor:.2f}", f"{mem:.1f}"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="out×in, e.g. 1536x384")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--repeats", type=int, default=0, help="timed steps per row (0: 7 / 5 / 3 for T ≤ 256 / ≤ 1024 / more)")
    parser.add_argument("--output", default=None, help="markdown file (default experiments/results/bench_layers-T<tokens>.md)")
    args = parser.parse_args(argv)
    header = ["method", "ms", "÷ dense", "FLOPs ÷ dense", "time ÷ FLOP floor", "memory MiB"]
    started = time.perf_counter()
    text = [f"# Layer training step (fwd + bwd + Adam, input gradient on), SVFT^B d=2 full rank\n\n"
            f"`python -m experiments.bench_layers --tokens {' '.join(map(str, args.tokens))} --shapes {' '.join(args.shapes)}`\n\n"
            f"{machine_description()}\n"]
    for tokens in args.tokens:
        repeats = args.repeats or (7 if tokens <= 256 else 5 if tokens <= 1024 else 3)
        for shape in args.shapes:
            d_out, d_in = (int(v) for v in shape.lower().split("x"))
            rows = bench_shape(d_out, d_in, tokens, repeats, args.strategies)
            block = f"\n## {d_out}×{d_in} (out × in), T = {tokens}, median of {repeats}\n\n" + markdown_table(header, rows) + "\n"
            print(block, flush=True)
            text.append(block)
    text.append(f"\nTotal run time {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.1f}.\n")
    output = args.output or os.path.join(os.path.dirname(__file__), "results", f"bench_layers-T{'-'.join(map(str, args.tokens))}.md")
    with open(output, "w") as handle:
        handle.write("".join(text))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
