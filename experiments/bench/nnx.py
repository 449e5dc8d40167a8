"""One Tunix Llama3 model, three ways to fine-tune it, side by side: SVFT banded d=2 through
`svft_jax.nnx` (strategy `auto`), qwix LoRA r=8 (α=16), and full fine-tuning.

Each method adapts a clone of the same randomly initialised model (MLP kernels given random
values: Tunix zero-initialises them), on every attention and MLP projection (the embedding and
head stay frozen; full FT trains every Param). Each gets the same training step — next-token
cross-entropy, AdamW, `nnx.value_and_grad` with `wrt=nnx.LoRAParam` (adapters) or `nnx.Param`
(full FT), the model and optimizer state donated — compiled once with `jax.jit`, then timed
round-robin (one step of each method per round, so load changes on a shared machine hit all
alike); medians are reported with ratios to qwix LoRA and to full FT. Peak memory is XLA's
compiled memory analysis of the step (temp + argument + output − aliased bytes): what the
step needs resident, not a measured RSS; on GPU the device's own peak is added when it reports
one.

    python -m experiments.bench.nnx --config=llama-4x256 --repeats=5

Needs the `nnx` extra (google-tunix, qwix: Python ≥ 3.12).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.harness.bench import machine_description, markdown_table

PROJECTIONS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclasses.dataclass(frozen=True)
class Config:
    layers: int
    embed: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    batch: int
    tokens: int


CONFIGS = {
    "tiny": Config(2, 64, 128, 4, 2, 16, 256, 2, 32),  # a smoke run (tests)
    "llama-4x256": Config(8, 512, 1376, 8, 8, 64, 8192, 4, 256),  # bench_step's llama shape
    "smollm2-4x256": Config(30, 576, 1536, 9, 3, 64, 49152, 4, 256),  # SmolLM2-135M's shape
}


def build_model(config: Config):
    from tunix.models.llama3 import model as llama3

    model_config = llama3.ModelConfig(num_layers=config.layers, vocab_size=config.vocab, embed_dim=config.embed,
                                      hidden_dim=config.hidden, num_heads=config.heads, head_dim=config.head_dim,
                                      num_kv_heads=config.kv_heads, rope_theta=10_000, norm_eps=1e-5)
    model = llama3.Llama3(model_config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Linear):  # Tunix zero-initialises MLP kernels
            module.kernel.set_value(jnp.asarray(rng.standard_normal(module.kernel.shape) / np.sqrt(module.kernel.shape[0]),
                                                module.kernel[...].dtype))
    return model


def batch(config: Config, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(1, config.vocab, (config.batch, config.tokens)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(config.tokens), tokens.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((config.tokens, config.tokens), bool)), (config.batch, config.tokens, config.tokens))
    return tokens, positions, mask


def adapted(name: str, base, inputs):
    """(model, the variable type the optimizer trains) for one method."""
    tokens, positions, mask = inputs
    if name == "full FT":
        return nnx.clone(base), nnx.Param
    if name == "qwix LoRA r=8":
        import qwix

        provider = qwix.LoraProvider(module_path=PROJECTIONS, rank=8, alpha=16.0)
        model = qwix.apply_lora_to_model(base, provider, tokens, positions, None, mask, rngs=nnx.Rngs(0))
        # qwix 0.1.8 swaps the model's class for a subclass made with `type(...)`, which on flax
        # 0.12 takes flax's default pytree mode instead of Tunix's `pytree=False`; gradients then
        # fail ("Cannot extract graph node from different trace level"). Restore the base's mode.
        original = getattr(type(model), "_unquantized_type", None)
        if original is not None and hasattr(original, "_pytree__is_pytree"):
            type(model)._pytree__is_pytree = original._pytree__is_pytree
        return model, nnx.LoRAParam
    import svft_jax.nnx as snnx

    return snnx.adapt(base, snnx.SVFT(pattern=snnx.Banded(d=2)), tokens, positions, None, mask), nnx.LoRAParam


def compiled_step(model, wrt, inputs):
    """(nnx.jit step (model, optimizer, *inputs) -> loss, optimizer, compiled peak bytes).

    nnx.jit (as Tunix's trainers use), not jax.jit over nnx.split: qwix's LoRA model is a
    subclass made without Tunix's `pytree=False`, which a manual split/merge inside jit refuses.
    """
    # own buffers: the step donates model and optimizer, and the clones share the base's arrays
    nnx.update(model, jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else a, nnx.state(model)))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=wrt)

    def loss_fn(model, tokens, positions, mask):
        logits, _ = model(tokens, positions, None, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    def step(model, optimizer, tokens, positions, mask):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, tokens, positions, mask)
        optimizer.update(model, grads)
        return loss

    jitted = nnx.jit(step, donate_argnames=("model", "optimizer"))
    peak = None
    try:
        analysis = jitted.lower(model, optimizer, *inputs).compile().memory_analysis()
    except (AttributeError, NotImplementedError):  # a flax/jax without these stages: no peak column
        analysis = None
    if analysis is not None:
        peak = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                - analysis.alias_size_in_bytes)
    return jitted, optimizer, peak


def trainable(model, wrt) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, wrt)))


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="llama-4x256", choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None, help="markdown file (default experiments/results/bench_nnx_<config>.md)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    config = CONFIGS[args.config]
    base = build_model(config)
    inputs = batch(config)
    names = ("SVFT banded d=2 (auto)", "qwix LoRA r=8", "full FT")
    runs = {}
    for name in names:
        model, wrt = adapted(name, base, inputs)
        step, optimizer, peak = compiled_step(model, wrt, inputs)
        strategies = ""
        if name.startswith("SVFT"):
            plan = type(model)._svft_last_plan
            chosen = sorted({"+".join(v) for v in plan.values()})
            strategies = ", ".join(f"{c}: {sum('+'.join(v) == c for v in plan.values())}" for c in chosen)
        loss = step(model, optimizer, *inputs)  # warm-up: compiles (nnx.jit's own cache) and allocates
        jax.block_until_ready(loss)
        runs[name] = {"step": step, "model": model, "optimizer": optimizer, "peak": peak, "times": [], "loss": float(loss),
                      "trainable": trainable(model, wrt), "strategies": strategies}
    for _ in range(args.repeats):
        for name in names:
            run = runs[name]
            start = time.perf_counter()
            loss = run["step"](run["model"], run["optimizer"], *inputs)
            jax.block_until_ready(loss)
            run["times"].append(time.perf_counter() - start)
    device_peak = None
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        device_peak = stats["peak_bytes_in_use"]
    median = {name: statistics.median(runs[name]["times"]) for name in names}
    lora, full = "qwix LoRA r=8", "full FT"
    rows = []
    for name in names:
        run = runs[name]
        peak = run["peak"]
        rows.append([name, f"{run['trainable']:,}", f"{1e3 * median[name]:.1f}", f"{median[name] / median[lora]:.2f}",
                     f"{median[name] / median[full]:.2f}",
                     "n/a" if peak is None else f"{peak / 2**20:.1f}",
                     "n/a" if peak is None or runs[lora]["peak"] is None else f"{peak / runs[lora]['peak']:.2f}",
                     "n/a" if peak is None or runs[full]["peak"] is None else f"{peak / runs[full]['peak']:.2f}"])
    report = "\n".join([
        f"# bench_nnx: {args.config} (Tunix Llama3, {config.layers} layers, hidden {config.embed}, MLP {config.hidden}, "
        f"vocab {config.vocab}; batch {config.batch}×{config.tokens} tokens)",
        "",
        machine_description(),
        f"- {args.repeats} timed steps per method (round-robin), medians; peak = XLA compiled memory analysis of the step",
        "",
        markdown_table(["method", "trainable", "step ms", "÷ LoRA", "÷ full FT", "peak MiB", "÷ LoRA", "÷ full FT"], rows),
        "",
        f"SVFT strategies chosen by the cost model: {runs[names[0]]['strategies']}",
        *([f"Device peak over the whole run: {device_peak / 2**20:.1f} MiB"] if device_peak else []),
    ])
    output = pathlib.Path(args.output or f"experiments/results/bench_nnx_{args.config}.md")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report + "\n")
    print(report)
    return report


if __name__ == "__main__":
    main()
