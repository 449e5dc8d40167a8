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
  linen-llama-scan-4x256     the same shape as a linen model (`experiments.harness.models.LinenLlama`,
                             tied head) with its blocks `nn.scan`ned and remat'ed, as LLMs are
                             trained in JAX: kernels stacked (8, in, out);
  linen-llama-4x256          the same linen model unrolled (no scan, no remat): the ratios of
                             the two rows show what scanning costs each strategy.
Adapters target every attention and MLP kernel (the library default); the classifier head
(BERT) is trained fully by every adapter method.

    python -m experiments.bench.step --config=bert-16x64 --repeats=5

Methods are the harness's presets (`experiments.harness.presets`) plus execution options; the models
come from `experiments.harness.models`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
import time
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax

import svft_jax
from experiments.harness import config as config_lib
from experiments.harness import models, presets
from experiments.harness.bench import machine_description, markdown_table
from svft_jax.training import losses


@dataclasses.dataclass
class Method:
    name: str
    preset: str  # an `experiments.harness.presets` name
    strategy: str | None  # None: full FT (no nodes)
    options: dict = dataclasses.field(default_factory=dict)  # extra `apply` keywords

    def build(self, params, targets=None, stacked=None):
        """The preset's adapter on `params`; `stacked`: the regex of (layers, in, out) kernels."""
        preset = presets.get(self.preset)
        extra = {"svd_backend": "numpy", **self.options} if preset.method == "svft" else dict(self.options)
        if stacked is not None and preset.method == "svft":
            extra["overrides"] = {stacked: {"layout": "stacked_in_out"}}
        elif stacked is not None and preset.method != "full":
            extra["layouts"] = {stacked: "stacked_in_out"}
        return preset.adapt(params, targets=targets, **extra)


@dataclasses.dataclass(frozen=True)
class LinenLM:
    """A linen apply_fn(params, ids) behind the call convention of transformers' models that this
    benchmark uses: `model(input_ids, params=tree).logits`."""

    apply_fn: object

    def __call__(self, input_ids, params):
        return LMOutput(logits=self.apply_fn(params, input_ids))


class LMOutput(typing.NamedTuple):  # a pytree, as `wrap` needs of a traced output
    logits: jax.Array


def methods(selection: str) -> list[Method]:
    every = [
        Method("full FT", "full_ft", None),
        Method("LoRA r=8 (factored)", "lora_r8", "factored"),
        Method("LoRA r=1 (factored)", "lora_r1", "factored"),
        Method("VeRA r=256 (factored)", "vera_r256", "factored"),
        Method("DoRA r=1 (factored)", "dora_r1", "factored"),
        Method("SVFT plain, auto", "svft_plain", "auto"),
        Method("SVFT banded d=2, rebuild", "svft_banded_d2", "rebuild"),
        Method("SVFT banded d=2, rebuild_remat", "svft_banded_d2", "rebuild_remat"),
        Method("SVFT banded d=2, factored", "svft_banded_d2", "factored"),
        Method("SVFT banded d=2, auto", "svft_banded_d2", "auto"),
        Method("SVFT banded d=2, auto, no W0", "svft_banded_d2", "auto", {"keep_base": False}),
        Method("SVFT banded d=2, auto, bf16 U/V, no W0", "svft_banded_d2", "auto", {"keep_base": False, "factor_dtype": jnp.bfloat16}),
        Method("SVFT banded d=2, reference (authors' layer)", "svft_banded_d2", "reference", {"keep_base": False, "init": "reference"}),
        Method("SVFT random (k = d=2 budget), auto", "svft_random_d2", "auto"),
        Method("SVFT top-k (k = d=2 budget), auto", "svft_topk_d2", "auto"),
        Method("SVFT banded d=2 rank=64, auto", "svft_banded_d2", "auto", {"rank": 64}),
        Method("SVFT banded d=2 rank=8, factored", "svft_banded_d2", "factored", {"rank": 8}),
        Method("SVFT plain rank=1, factored", "svft_plain", "factored", {"rank": 1}),
    ]
    if selection == "all":
        return every
    if selection == "memory":  # what keeping W0 and the factors' dtype cost, against LoRA and full FT
        return [m for m in every if m.name in ("full FT", "LoRA r=8 (factored)", "SVFT banded d=2, auto",
                                               "SVFT banded d=2, auto, no W0", "SVFT banded d=2, auto, bf16 U/V, no W0")]
    core = ("full FT", "LoRA r=8 (factored)", "LoRA r=1 (factored)", "SVFT banded d=2, rebuild",
            "SVFT banded d=2, factored", "SVFT banded d=2, auto", "SVFT banded d=2, auto, no W0",
            "SVFT banded d=2, auto, bf16 U/V, no W0",
            "SVFT banded d=2 rank=8, factored", "SVFT plain rank=1, factored",
            "SVFT banded d=2, reference (authors' layer)")
    return [m for m in every if m.name in core]


def build_model(config: str):
    """(model, params, batch, loss_fn(logits, batch), extra regex, tokens per step, apply options)."""
    rng = np.random.default_rng(0)
    if config.startswith("bert"):
        batch, seq = {"bert-16x64": (16, 64), "bert-32x128": (32, 128)}[config]
        model, params = models.random_bert_classifier()
        data = {"input_ids": rng.integers(0, 30522, (batch, seq), dtype=np.int32),
                "labels": rng.integers(0, 2, (batch,), dtype=np.int32)}
        loss = lambda logits, b: losses.classification_loss(logits, b["labels"])[0]  # noqa: E731
        return model, params, data, loss, "classifier/.*", batch * seq, {}
    batch, seq = 4, 256
    data = {"input_ids": rng.integers(0, 8192, (batch, seq), dtype=np.int32)}
    loss = lambda logits, b: losses.causal_lm_loss(logits, b["input_ids"])[0]  # noqa: E731
    if config.startswith("linen"):
        scan = config == "linen-llama-scan-4x256"
        apply_fn, params = models.linen_llama(scan=scan, remat=scan)
        options = {"targets": models.LINEN_LLAMA_TARGETS, "stacked": r"layers/.*kernel" if scan else None}
        return LinenLM(apply_fn), params, data, loss, None, batch * seq, options
    model, params = models.random_llama(max_length=seq)
    return model, params, data, loss, None, batch * seq, {}


def make_step(model, method: Method, adapted, loss_of, extra):
    """(jitted step, trainable, frozen, opt_state). step(trainable, frozen, opt, batch)."""
    if method.strategy is None:
        trainable, frozen = adapted, None
        run = lambda tree, ids: model(ids, params=tree).logits  # noqa: E731
    else:
        trainable, frozen = svft_jax.split(adapted, extra=extra)
        wrapped = svft_jax.wrap(model, method.strategy, params_argname="params", strict=True)  # no silent fallback
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


CONFIGS = ("bert-16x64", "bert-32x128", "llama-4x256", "linen-llama-scan-4x256", "linen-llama-4x256")


@dataclasses.dataclass(frozen=True)
class Options:
    """config: model and batch shape; methods: "all", "core" or "memory"; repeats: timed rounds; output: the .md."""

    config: str = "bert-16x64"
    methods: str = "all"
    repeats: int = 5
    output: str | None = None

    def __post_init__(self):
        if self.config not in CONFIGS or self.methods not in ("all", "core", "memory") or self.repeats < 1:
            raise ValueError(f"bench_step: --config in {CONFIGS}, --methods all|core|memory, --repeats ≥ 1; got {self}.")


def main(argv=None) -> None:
    (args,) = config_lib.parse(argv, Options(), description=__doc__)
    # one file per (config, method set): a memory run must not overwrite the core run's table
    suffix = "" if args.methods == "core" else f"-{args.methods}"
    output = pathlib.Path(args.output or f"experiments/results/bench_step_{args.config}{suffix}.md")
    start = time.perf_counter()
    model, params, batch, loss_of, extra, tokens, apply_options = build_model(args.config)

    states, memory, counts, compile_s = {}, {}, {}, {}
    for method in methods(args.methods):
        adapted = method.build(params, **apply_options)
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
            f"- Command: `python -m experiments.bench.step --config {args.config} --methods {args.methods} --repeats {args.repeats}` "
            f"(total {time.perf_counter() - start:.0f} s)\n\n{table}\n")
    output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
