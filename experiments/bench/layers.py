"""One layer's training step under every execution strategy, side by side, with FLOP floors and
peak memory.

    python -m experiments.bench.layers                      # T = 1024, the five shapes
    python -m experiments.bench.layers --tokens 256 4096 --shapes 384x384 1536x384 384x1536 768x768
    python -m experiments.bench.layers --models bert-16x64 bert-32x128 llama-4x256   # whole models
    python -m experiments.bench.layers --profile --tokens 1024 4096    # where the time goes (band vs matmuls)

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
import dataclasses
import os
import time
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import svft_jax  # noqa: E402
from experiments.harness.bench import machine_description, markdown_table, timed  # noqa: E402
from svft_jax import baselines  # noqa: E402
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


def _compile(trainable, frozen, loss_of, x, cotangent):
    """(timed thunk, memory MiB) of one compiled step."""
    tx = svft_jax.optimizer(optax.adam(1e-3)) if frozen is not None else optax.adam(1e-3)
    args = (trainable, tx.init(trainable), frozen, x, cotangent)
    compiled = _step_fn(loss_of, tx).lower(*args).compile()
    jax.block_until_ready(compiled(*args))  # warm-up
    return (lambda: compiled(*args)), _memory_mib(compiled)


def _round_robin(thunks: dict, repeats: int) -> dict:
    """Median wall seconds per thunk, timed one call of each per round, so load changes on a
    shared machine hit every row alike."""
    times = {name: [] for name in thunks}
    for _ in range(repeats):
        for name, thunk in thunks.items():
            times[name].append(timed(thunk, 1)[0])
    return {name: float(np.median(t)) for name, t in times.items()}


def _layer_problem(d_out: int, d_in: int, tokens: int):
    """(params {"layer": {"kernel": (d_in, d_out)}}, x (T, d_in), cotangent (T, d_out)), seeded."""
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), jnp.float32)
    x = jnp.asarray(rng.standard_normal((tokens, d_in)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((tokens, d_out)), jnp.float32)
    return {"layer": {"kernel": kernel}}, x, cotangent


def _counted_as(strategy: str, chosen: str) -> str:
    """The cost-model entry a strategy's FLOP floor is read from: the authors' layer rebuilds W on
    every use (rebuild's count), rebuild_remat too; auto: what it chose."""
    return {"reference": "rebuild", "auto": chosen, "rebuild_remat": "rebuild"}.get(strategy, strategy)


def bench_shape(d_out: int, d_in: int, tokens: int, repeats: int, strategies) -> list[list]:
    params, x, cotangent = _layer_problem(d_out, d_in, tokens)
    r = min(d_in, d_out)
    dense_flops = 3 * tokens * d_out * d_in
    entries = svft_jax.banded_count(r, 2)
    thunks, memory, floors, runs = {}, {}, {}, {}

    thunks["dense FT"], memory["dense FT"] = _compile(params, None, lambda t, f, x: _layer(t, x), x, cotangent)
    floors["dense FT"] = 1.0
    adapted = svft_jax.apply(params, "banded", d=2, svd_backend="numpy")
    dropped = drop_unused_base(adapted)
    for strategy in strategies:
        tree = adapted if strategy == "factored" else dropped
        trainable, frozen = svft_jax.split(tree)
        run = wrap(_layer, strategy)
        name = f"svft-{strategy}"
        thunks[name], memory[name] = _compile(trainable, frozen, lambda t, f, x, run=run: run(svft_jax.combine(t, f), x), x, cotangent)
        runs[name] = run
        chosen = "+".join(sorted(set().union(*map(set, run.last_plan.values()))))
        costs = step_flops(d_out, d_in, r, tokens, has_base=strategy == "factored", entries=entries)
        floors[name] = costs[_counted_as(strategy, chosen)] / dense_flops
    lora = baselines.lora.apply(params, rank=8)
    trainable, frozen = svft_jax.split(lora)
    run = wrap(_layer, "factored")
    name = "lora r=8 (factored)"
    thunks[name], memory[name] = _compile(trainable, frozen, lambda t, f, x: run(svft_jax.combine(t, f), x), x, cotangent)
    floors[name] = step_flops(d_out, d_in, 8, tokens)["factored"] / dense_flops

    wall = _round_robin(thunks, repeats)
    dense_ms = wall["dense FT"] * 1e3
    rows = []
    for name in thunks:
        ms = wall[name] * 1e3
        label = name + (f" (→ {'+'.join(sorted(set().union(*map(set, runs[name].last_plan.values()))))})" if name == "svft-auto" else "")
        rows.append([label, f"{ms:.1f}", f"{ms / dense_ms:.2f}", f"{floors[name]:.2f}",
                     f"{ms / dense_ms / floors[name]:.2f}", f"{memory[name]:.1f}"])
    return rows


# ---- where the time goes ----------------------------------------------------------------------


def profile_shape(d_out: int, d_in: int, tokens: int, strategies, repeats: int) -> list[list]:
    """Where a strategy's time goes, by ablation: each strategy timed with SVFT^B d=2 and with
    SVFT^P (the same matmuls; M is a scale instead of 2d+1 shifted slices), side by side with
    dense FT.

    A per-op profile of XLA:CPU does not add up (its dots run on thread pools whose work the
    trace attributes unevenly), so the split is measured end to end instead: "matmul chain ÷
    floor" is the plain run's time ÷ (dense FT's × the plain run's FLOP ratio), i.e. how fast
    the strategy's matmuls run per FLOP against the dense step; "band ÷ dense" is what the band
    adds (banded − plain) ÷ the dense step; "band share" is that over the banded step.
    """
    params, x, cotangent = _layer_problem(d_out, d_in, tokens)
    r = min(d_in, d_out)
    dense_flops = 3 * tokens * d_out * d_in
    thunks, floors = {}, {}
    thunks["dense FT"], _ = _compile(params, None, lambda t, f, x: _layer(t, x), x, cotangent)
    patterns = {"banded": dict(pattern="banded", d=2), "plain": dict(pattern="plain")}
    for strategy in strategies:
        for label, options in patterns.items():
            adapted = svft_jax.apply(params, **options, svd_backend="numpy")
            tree = adapted if strategy == "factored" else drop_unused_base(adapted)
            trainable, frozen = svft_jax.split(tree)
            run = wrap(_layer, strategy)
            thunks[(strategy, label)], _ = _compile(trainable, frozen, lambda t, f, x, run=run: run(svft_jax.combine(t, f), x), x, cotangent)
            chosen = "+".join(sorted(set().union(*map(set, run.last_plan.values()))))
            entries = svft_jax.banded_count(r, 2) if label == "banded" else r
            costs = step_flops(d_out, d_in, r, tokens, has_base=strategy == "factored", entries=entries)
            floors[(strategy, label)] = costs[_counted_as(strategy, chosen)] / dense_flops
    wall = _round_robin(thunks, repeats)
    dense = wall["dense FT"]
    rows = [["dense FT", f"{dense * 1e3:.1f}", "", "1.00", "1.00", "", "", ""]]
    for strategy in strategies:
        banded, plain = wall[(strategy, "banded")], wall[(strategy, "plain")]
        rows.append([f"svft-{strategy}", f"{banded * 1e3:.1f}", f"{plain * 1e3:.1f}", f"{banded / dense:.2f}",
                     f"{banded / dense / floors[(strategy, 'banded')]:.2f}",
                     f"{plain / dense / floors[(strategy, 'plain')]:.2f}",
                     f"{(banded - plain) / dense:+.2f}", f"{(banded - plain) / banded:+.0%}"])
    return rows


# ---- numerics ---------------------------------------------------------------------------------


def numerics(shapes, tokens: int = 256) -> list[list]:
    """Relative error ‖y − y_exact‖/‖y_exact‖ of one layer's output against float64
    x (W0 + U M Vᵀ)ᵀ, with M ≠ 0 (m ~ N(0, 0.01·s̄²)), per strategy and factor dtype."""
    rows = []
    for shape in shapes:
        d_out, d_in = (int(v) for v in shape.lower().split("x"))
        rng = np.random.default_rng(0)
        kernel = np.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), np.float32)
        x = np.asarray(rng.standard_normal((tokens, d_in)), np.float32)
        params = {"layer": {"kernel": jnp.asarray(kernel)}}
        for dtype in (jnp.float32, jnp.bfloat16):
            adapted = svft_jax.apply(params, "banded", d=2, svd_backend="numpy", factor_dtype=dtype)
            node = adapted["layer"]["kernel"]
            m = rng.standard_normal(node.m.shape).astype(np.float32) * 0.1 * float(np.mean(np.asarray(node.s, np.float32)))
            node = dataclasses.replace(node, m=jnp.asarray(m))
            adapted = {"layer": {"kernel": node}}
            u, v = np.asarray(node.u, np.float64), np.asarray(node.v, np.float64)
            dense_m = np.zeros((node.meta.rank,) * 2)
            np.add.at(dense_m, (node.meta.rows.array, node.meta.cols.array), m.astype(np.float64))
            exact = x.astype(np.float64) @ (kernel.astype(np.float64).T + u @ dense_m @ v.T).T
            row = [shape, jnp.dtype(dtype).name]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for strategy in ("rebuild", "factored", "spectral"):
                    got = np.asarray(jax.jit(wrap(_layer, strategy))(adapted, jnp.asarray(x)), np.float64)
                    row.append(f"{np.linalg.norm(got - exact) / np.linalg.norm(exact):.1e}")
            rows.append(row)
    return rows


# ---- whole-model steps ------------------------------------------------------------------------


def _model(config: str):
    """(model, input_ids, loss(logits), extra regex) for a randomly initialised transformers model."""
    rng = np.random.default_rng(0)
    if config.startswith("bert"):
        from transformers import BertConfig, FlaxBertForSequenceClassification

        batch, seq = {"bert-16x64": (16, 64), "bert-32x128": (32, 128)}[config]
        model = FlaxBertForSequenceClassification(
            BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                       vocab_size=30522, num_labels=2), seed=0)
        ids = rng.integers(0, 30522, (batch, seq), dtype=np.int32)
        labels = jnp.asarray(rng.integers(0, 2, (batch,), dtype=np.int32))
        loss = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()  # noqa: E731
        return model, ids, loss, "classifier/.*"
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    batch, seq = 4, 256
    model = FlaxLlamaForCausalLM(
        LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                    intermediate_size=1376, vocab_size=8192, max_position_embeddings=seq), seed=0)
    ids = rng.integers(0, 8192, (batch, seq), dtype=np.int32)
    loss = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()  # noqa: E731
    return model, ids, loss, None


def bench_model(config: str, repeats: int) -> list[list]:
    model, ids, loss_of, extra = _model(config)
    params = model.params
    methods = {
        "full FT": (params, None),
        "LoRA r=8 (factored)": (baselines.lora.apply(params, rank=8, extra=extra), "factored"),
    }
    banded = svft_jax.apply(params, "banded", d=2, svd_backend="numpy", extra=extra)
    dropped = drop_unused_base(banded)
    methods["SVFT^B d=2 rebuild (W0 kept)"] = (banded, "rebuild")
    methods["SVFT^B d=2 spectral"] = (dropped, "spectral")
    methods["SVFT^B d=2 auto"] = (dropped, "auto")
    methods["SVFT^B d=2 reference (authors')"] = (dropped, "reference")
    thunks, memory, plans = {}, {}, {}
    for name, (tree, strategy) in methods.items():
        tx = optax.adamw(1e-4)
        if strategy is None:
            trainable, frozen = tree, None
            run = lambda t, f: model(ids, params=t).logits  # noqa: E731
        else:
            trainable, frozen = svft_jax.split(tree)
            wrapped = wrap(model, strategy, params_argname="params")
            run = lambda t, f, wrapped=wrapped: wrapped(ids, params=svft_jax.combine(t, f)).logits  # noqa: E731
            plans[name] = wrapped

        def step(trainable, frozen, opt_state, run=run, tx=tx):
            value, grads = jax.value_and_grad(lambda t: loss_of(run(t, frozen)))(trainable)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, value

        args = (trainable, frozen, tx.init(trainable))
        compiled = jax.jit(step).lower(*args).compile()
        jax.block_until_ready(compiled(*args))
        thunks[name] = lambda compiled=compiled, args=args: compiled(*args)
        memory[name] = _memory_mib(compiled)
    wall = _round_robin(thunks, repeats)
    full, lora = wall["full FT"], wall["LoRA r=8 (factored)"]
    rows = []
    for name in thunks:
        mix = ""
        if name in plans:
            used = [s for p in plans[name].last_plan.values() for s in p]
            mix = ", ".join(f"{s} {used.count(s)}" for s in sorted(set(used)))
        rows.append([name, f"{wall[name] * 1e3:.0f}", f"{wall[name] / full:.2f}", f"{wall[name] / lora:.2f}",
                     f"{memory[name]:.0f}", f"{memory[name] / memory['LoRA r=8 (factored)']:.2f}", mix])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="out×in, e.g. 1536x384")
    parser.add_argument("--strategies", nargs="+", default=None,
                        help=f"default: {' '.join(STRATEGIES)} (with --profile: all but auto)")
    parser.add_argument("--repeats", type=int, default=0, help="timed steps per row (0: 7 / 5 / 3 for T ≤ 256 / ≤ 1024 / more)")
    parser.add_argument("--models", nargs="*", default=None, choices=["bert-16x64", "bert-32x128", "llama-4x256"],
                        help="whole-model steps instead of the layer table")
    parser.add_argument("--numerics", action="store_true", help="output error per strategy and factor dtype instead of timings")
    parser.add_argument("--profile", action="store_true",
                        help="where the time goes: each strategy with SVFT^B d=2 and with SVFT^P (same matmuls), so the band's cost shows")
    parser.add_argument("--output", default=None, help="markdown file (default experiments/results/bench_layers-T<tokens>.md)")
    args = parser.parse_args(argv)
    if args.profile and args.strategies and "auto" in args.strategies:
        # auto may choose differently for SVFT^B and SVFT^P (their |Ω| differ), so their difference
        # would not be the band's cost
        parser.error("--profile ablates a fixed strategy (SVFT^B vs SVFT^P); 'auto' can choose differently "
                     "for the two, so name the strategies it picks (e.g. --strategies spectral rebuild).")
    args.strategies = args.strategies or [s for s in STRATEGIES if not (args.profile and s == "auto")]
    header = ["method", "ms", "÷ dense", "FLOPs ÷ dense", "time ÷ FLOP floor", "memory MiB"]
    started = time.perf_counter()
    text = [f"# Layer training step (fwd + bwd + Adam, input gradient on), SVFT^B d=2 full rank\n\n"
            f"`python -m experiments.bench.layers --tokens {' '.join(map(str, args.tokens))} --shapes {' '.join(args.shapes)}`\n\n"
            f"{machine_description()}\n"]
    if args.numerics:
        text[0] = (f"# Numerics: one layer's output vs float64 x (W0 + U M Vᵀ)ᵀ, SVFT^B d=2 full rank, M ≠ 0, T = 256\n\n"
                   f"`python -m experiments.bench.layers --numerics`\n\n{machine_description()}\n\n")
        block = markdown_table(["shape", "factors", "rebuild (W0 kept)", "factored (W0 kept)", "spectral (W0 not read)"], numerics(args.shapes)) + "\n"
        print(block)
        text.append(block)
        args.tokens, args.models = [], ["numerics"]
    elif args.profile:
        text[0] = (f"# Where the time goes: one layer's training step per strategy, SVFT^B d=2 vs SVFT^P, full rank\n\n"
                   f"`python -m experiments.bench.layers --profile --tokens {' '.join(map(str, args.tokens))} --shapes {' '.join(args.shapes)} --strategies {' '.join(args.strategies)}`\n\n"
                   f"{machine_description()}\n- {' '.join(profile_shape.__doc__.split(chr(10) + chr(10))[1].split())}\n")
        profile_header = ["method", "banded ms", "plain ms", "banded ÷ dense", "banded ÷ FLOP floor",
                          "matmul chain ÷ floor", "band ÷ dense", "band share"]
        for tokens in args.tokens:
            repeats = args.repeats or (7 if tokens <= 256 else 5 if tokens <= 1024 else 3)
            for shape in args.shapes:
                d_out, d_in = (int(v) for v in shape.lower().split("x"))
                rows = profile_shape(d_out, d_in, tokens, args.strategies, repeats)
                block = f"\n## {d_out}×{d_in} (out × in), T = {tokens}, median of {repeats} (round-robin)\n\n" + markdown_table(profile_header, rows) + "\n"
                print(block, flush=True)
                text.append(block)
        args.models, args.tokens = ["profile-T" + "-".join(map(str, args.tokens))], []
    elif args.models:
        text[0] = (f"# Whole-model training step (fwd + bwd + AdamW), SVFT^B d=2 full rank\n\n"
                   f"`python -m experiments.bench.layers --models {' '.join(args.models)}`\n\n{machine_description()}\n")
        model_header = ["method", "ms", "÷ full FT", "÷ LoRA r=8", "memory MiB", "memory ÷ LoRA", "strategies (targets)"]
        for config in args.models:
            repeats = args.repeats or 5
            block = f"\n## {config}, median of {repeats} (round-robin)\n\n" + markdown_table(model_header, bench_model(config, repeats)) + "\n"
            print(block, flush=True)
            text.append(block)
        args.tokens = []
    for tokens in args.tokens:
        repeats = args.repeats or (7 if tokens <= 256 else 5 if tokens <= 1024 else 3)
        for shape in args.shapes:
            d_out, d_in = (int(v) for v in shape.lower().split("x"))
            rows = bench_shape(d_out, d_in, tokens, repeats, args.strategies)
            block = f"\n## {d_out}×{d_in} (out × in), T = {tokens}, median of {repeats} (round-robin)\n\n" + markdown_table(header, rows) + "\n"
            print(block, flush=True)
            text.append(block)
    text.append(f"\nTotal run time {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.1f}.\n")
    suffix = "-".join(args.models) if args.models else "T" + "-".join(map(str, args.tokens))
    output = args.output or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", f"bench_layers-{suffix}.md")
    with open(output, "w") as handle:
        handle.write("".join(text))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
