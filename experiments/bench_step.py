"""Training-step cost of SVFT under each execution strategy, against full FT, LoRA, VeRA, DoRA.

One run builds every method on the same model, compiles one jitted training step each
(forward, backward, AdamW update; trainable state donated), then times the steps
round-robin (`repeats` rounds, one step of every method per round, so load changes on a
shared machine hit every method alike) and reports medians as ratios to LoRA r=8 and to
full fine-tuning. Peak memory is XLA's compiled memory analysis of the step
(`jit(step).lower(...).compile().memory_analysis()`: temp + argument + output − aliased
bytes), i.e. what the step needs resident, not a measured RSS.

Configs (randomly initialised, transformers Flax classes):
  bert-16x64 / bert-32x128   all-MiniLM-L6-v2's shape: BERT, hidden 384, 6 layers, 12 heads,
                             MLP 1536, vocab 30522; sequence classification (2 labels);
                             batch 16×64 or 32×128 tokens.
  llama-4x256                Llama: hidden 512, 8 layers, 8 heads, MLP 1376, vocab 8192;
                             causal LM; batch 4×256 tokens.
Adapters target every attention and MLP kernel (the library default); the classifier head
(BERT) is trained fully by every adapter method.

    .venv/bin/python experiments/bench_step.py --config bert-16x64 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import svft_jax  # noqa: E402
from experiments._bench_common import machine_description, markdown_table  # noqa: E402
from svft_jax import baselines  # noqa: E402
from svft_jax.strategies import wrap  # noqa: E402
from svft_jax.training import losses  # noqa: E402
from svft_jax.transform.factorize import svd_cache  # noqa: E402


@dataclasses.dataclass
class Method:
    name: str
    build: Callable  # params -> adapted tree (or params for full FT)
    strategy: str | None  # None: full FT (no nodes)


def methods(selection: str) -> list[Method]:
    svft = lambda **kw: (lambda p: svft_jax.apply(p, svd_backend="numpy", **kw))  # noqa: E731
    every = [
        Method("full FT", lambda p: p, None),
        Method("LoRA r=8 (factored)", lambda p: baselines.lora.apply(p, rank=8), "factored"),
        Method("LoRA r=1 (factored)", lambda p: baselines.lora.apply(p, rank=1), "factored"),
        Method("VeRA r=256 (factored)", lambda p: baselines.vera.apply(p, rank=256), "factored"),
        Method("DoRA r=1 (factored)", lambda p: baselines.dora.apply(p, rank=1), "factored"),
        Method("SVFT plain, auto", svft(pattern="plain"), "auto"),
        Method("SVFT banded d=2, rebuild", svft(pattern="banded", d=2), "rebuild"),
        Method("SVFT banded d=2, rebuild_remat", svft(pattern="banded", d=2), "rebuild_remat"),
        Method("SVFT banded d=2, factored", svft(pattern="banded", d=2), "factored"),
        Method("SVFT banded d=2, auto", svft(pattern="banded", d=2), "auto"),
        Method("SVFT banded d=2, auto, bf16 U/V, no W0", svft(pattern="banded", d=2, keep_base=False, factor_dtype=jnp.bfloat16), "auto"),
        Method("SVFT banded d=2, reference (authors' layer)", svft(pattern="banded", d=2, keep_base=False, init="reference"), "reference"),
        Method("SVFT random (k = d=2 budget), auto", svft(pattern="random", d=2), "auto"),
        Method("SVFT top-k (k = d=2 budget), auto", svft(pattern="topk", d=2), "auto"),
        Method("SVFT banded d=2 rank=64, auto", svft(pattern="banded", d=2, rank=64), "auto"),
        Method("SVFT banded d=2 rank=8, factored", svft(pattern="banded", d=2, rank=8), "factored"),
        Method("SVFT plain rank=1, factored", svft(pattern="plain", rank=1), "factored"),
    ]
    if selection == "all":
        return every
    core = ("full FT", "LoRA r=8 (factored)", "LoRA r=1 (factored)", "SVFT banded d=2, rebuild",
            "SVFT banded d=2, factored", "SVFT banded d=2, auto", "SVFT banded d=2, auto, bf16 U/V, no W0",
            "SVFT banded d=2 rank=8, factored", "SVFT plain rank=1, factored",
            "SVFT banded d=2, reference (authors' layer)")
    return [m for m in every if m.name in core]


def build_model(config: str):
    """(model, batch, loss_fn(logits, batch), extra regex, tokens per step)."""
    rng = np.random.default_rng(0)
    if config.startswith("bert"):
        from transformers import BertConfig, FlaxBertForSequenceClassification

        batch, seq = {"bert-16x64": (16, 64), "bert-32x128": (32, 128)}[config]
        model = FlaxBertForSequenceClassification(
            BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                       vocab_size=30522, num_labels=2), seed=0)
        data = {"input_ids": rng.integers(0, 30522, (batch, seq), dtype=np.int32),
                "labels": rng.integers(0, 2, (batch,), dtype=np.int32)}
        loss = lambda logits, b: losses.classification_loss(logits, b["labels"])[0]  # noqa: E731
        return model, data, loss, "classifier/.*", batch * seq
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    batch, seq = 4, 256
    model = FlaxLlamaForCausalLM(
        LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                    intermediate_size=1376, vocab_size=8192, max_position_embeddings=seq), seed=0)
    data = {"input_ids": rng.integers(0, 8192, (batch, seq), dtype=np.int32)}
    loss = lambda logits, b: losses.causal_lm_loss(logits, b["input_ids"])[0]  # noqa: E731
    return model, data, loss, None, batch * seq


def make_step(model, method: Method, adapted, loss_of, extra):
    """(jitted step, trainable, frozen, opt_state). step(trainable, frozen, opt, batch)."""
    if method.strategy is None:
        trainable, frozen = adapted, None
        run = lambda tree, ids: model(ids, params=tree).logits  # noqa: E731
    else:
        trainable, frozen = svft_jax.split(adapted, extra=extra)
        wrapped = wrap(model, method.strategy, params_argname="params")
        run = lambda tree, ids: wrapped(ids, params=tree).logits  # noqa: E731
    tx = optax.adamw(1e-4)
    trainable = jax.tree.map(jnp.array, trainable)  # own copy: the step donates it

    def step(trainable, frozen, opt_state, batch):
        def loss(t):
            tree = t if frozen is None else svft_jax.combine(t, frozen)
            return loss_of(run(tree, batch["input_ids"]), batch)

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    opt_state = tx.init(trainable)
    return jax.jit(step, donate_argnums=(0, 2)), trainable, frozen, opt_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="bert-16x64", choices=["bert-16x64", "bert-32x128", "llama-4x256"])
    parser.add_argument("--methods", default="all", choices=["all", "core"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    output = pathlib.Path(args.output or f"experiments/results/bench_step_{args.config}.md")
    start = time.perf_counter()
    model, batch, loss_of, extra, tokens = build_model(args.config)
    params = model.params

    states, memory, counts, compile_s = {}, {}, {}, {}
    factors: dict = {}  # SVDs shared by every SVFT method (svft_jax's factor-cache hook)
    for method in methods(args.methods):
        with svd_cache(factors):
            adapted = method.build(params)
        step, trainable, frozen, opt_state = make_step(model, method, adapted, loss_of, extra)
        t0 = time.perf_counter()
        compiled = step.lower(trainable, frozen, opt_state, batch).compile()
        compile_s[method.name] = time.perf_counter() - t0
        stats = compiled.memory_analysis()
        memory[method.name] = (stats.temp_size_in_bytes + stats.argument_size_in_bytes
                               + stats.output_size_in_bytes - stats.alias_size_in_bytes)
        counts[method.name] = sum(x.size for x in jax.tree.leaves(trainable))
        trainable, opt_state, loss = compiled(trainable, frozen, opt_state, batch)  # warm-up
        jax.block_until_ready(loss)
        states[method.name] = [compiled, trainable, frozen, opt_state, []]
        print(f"compiled {method.name}: {compile_s[method.name]:.1f}s, loss {float(loss):.4f}", flush=True)
        del adapted

    for _ in range(args.repeats):
        for state in states.values():
            compiled, trainable, frozen, opt_state, times = state
            t0 = time.perf_counter()
            trainable, opt_state, loss = compiled(trainable, frozen, opt_state, batch)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - t0)
            state[1], state[3] = trainable, opt_state

    median = {name: statistics.median(state[4]) for name, state in states.items()}
    lora, full = "LoRA r=8 (factored)", "full FT"
    rows = []
    for name in states:
        rows.append([name, f"{counts[name]:,}", f"{median[name] * 1e3:.0f}", f"{tokens / median[name]:,.0f}",
                     f"{median[name] / median[lora]:.2f}", f"{median[name] / median[full]:.2f}",
                     f"{memory[name] / 2**20:.0f}", f"{memory[name] / memory[lora]:.2f}", f"{memory[name] / memory[full]:.2f}"])
    table = markdown_table(["method", "trainable", "step ms", "tokens/s", "time ÷ LoRA8", "time ÷ FT",
                            "peak MiB", "mem ÷ LoRA8", "mem ÷ FT"], rows)
    text = (f"# bench_step: {args.config}\n\n{machine_description()}\n"
            f"- {tokens} tokens per step; median of {args.repeats} round-robin steps after a warm-up step; "
            f"AdamW, trainable state donated.\n"
            f"- peak MiB = XLA compiled memory analysis of the jitted step (temp + argument + output − aliased), "
            f"not measured RSS.\n"
            f"- Command: `.venv/bin/python experiments/bench_step.py --config {args.config} --methods {args.methods} --repeats {args.repeats}` "
            f"(total {time.perf_counter() - start:.0f} s)\n\n{table}\n")
    output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
