"""Serving many SVFT adapters on one base: per-example routing vs separately merged models.

    OPENBLAS_NUM_THREADS=1 python -m experiments.bench.adapters [--batch 16] [--seq 32]

A MiniLM-sized BERT (hidden 384, 6 layers, intermediate 1536, random weights: the timing depends
on shapes only) with SVFT banded d=2 on q, k, v, o and both MLP kernels (36 targets). For
K ∈ {1, 4, 16} adapters (random coefficients), B requests of S tokens are served

  routed   in one jitted forward pass, example b through adapter b mod K
           (`svft_jax.adapters.route` + `svft_jax.wrap(..., strategy="routed")`: one copy of
           U, s, V, W0, K coefficient banks, no dense weight per adapter);
  merged   by K separately merged models (`svft_jax.merge` per adapter), run one after another
           on their B/K requests.

Printed: tokens/s of each, the ratio routed(K)/routed(1) (target ≤ 1.3 at K = 16), routed(1)
against one plain merged model (the price of factored execution), and the bytes held by the K
adapters' serving state vs K merged copies (target ≤ 1.05 × one adapter's model).
Times are medians of --repeats rounds after compiling everything; each round calls every
configuration once (side by side, so load drift on a shared machine hits all alike).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers

import svft_jax
import svft_jax.adapters as adapters
import svft_jax.models as svft_models


def unique_bytes(tree) -> int:
    """Bytes of the distinct array buffers in `tree` (a buffer shared by nodes counts once)."""
    seen, total = set(), 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "nbytes") and id(leaf) not in seen:
            seen.add(id(leaf))
            total += leaf.nbytes
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--spectral", action="store_true",
                        help="keep_base=False: y = ((x V)(Σ + M)ᵀ) Uᵀ, no W0 stored or multiplied")
    args = parser.parse_args()

    config = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, max_position_embeddings=512)
    model = transformers.FlaxBertModel(config, _do_init=False)
    g = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(g.normal(size=s.shape) * 0.05, s.dtype), model.params_shape_tree)
    start = time.perf_counter()
    adapted = svft_models.adapt(model, params, "banded", d=2, keep_base=not args.spectral)
    print(f"SVD of {svft_jax.count_parameters(adapted)['targets']} targets: {time.perf_counter() - start:.1f}s")

    def with_random_m(seed):
        rng = np.random.default_rng(seed)
        return jax.tree_util.tree_map(
            lambda x: dataclasses.replace(x, m=jnp.asarray(rng.normal(size=x.m.shape) * 0.01, jnp.float32)) if svft_jax.is_node(x) else x,
            adapted, is_leaf=svft_jax.is_node)

    tokens = jnp.asarray(g.integers(0, config.vocab_size, size=(args.batch, args.seq)), jnp.int32)
    total_tokens = args.batch * args.seq
    dense_forward = jax.jit(lambda p, ids: model(ids, params=p).last_hidden_state)
    routed_forward = jax.jit(svft_jax.wrap(lambda p, ids: model(ids, params=p).last_hidden_state, strategy="routed"))

    singles = [with_random_m(k) for k in range(max(args.adapters))]
    # Every configuration is compiled first, then timed round-robin (one call of each per
    # round), so a change in the load of this shared machine hits all of them alike.
    calls = {"plain": (dense_forward, (params, tokens))}
    memory = {}
    for k in args.adapters:
        tree = adapters.create(singles[0], "adapter0")
        for i in range(1, k):
            tree = adapters.add(tree, f"adapter{i}", singles[i])
        routed = adapters.route(tree, np.arange(args.batch) % k)
        merged = [jax.jit(svft_jax.merge)(singles[i]) for i in range(k)]
        groups = [np.flatnonzero(np.arange(args.batch) % k == i) for i in range(k)]

        def run_merged(merged=merged, groups=groups):
            return [dense_forward(merged[i], tokens[groups[i]]) for i in range(len(groups))]

        calls[("routed", k)] = (routed_forward, (routed, tokens))
        calls[("merged", k)] = (run_merged, ())
        memory[k] = (unique_bytes(routed), sum(unique_bytes(m) for m in merged))
    times = {name: [] for name in calls}
    for fn, call_args in calls.values():
        jax.block_until_ready(fn(*call_args))  # compile
    for _ in range(args.repeats):
        for name, (fn, call_args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*call_args))
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    plain_time = median["plain"]
    print(f"base model, one merged forward: {plain_time * 1e3:.1f} ms ({total_tokens / plain_time:,.0f} tokens/s)")
    first = {"time": median[("routed", args.adapters[0])], "bytes": memory[args.adapters[0]][0]}
    rows = [(k, median[("routed", k)], median[("merged", k)], *memory[k]) for k in args.adapters]
    print()
    print("| K | routed ms | routed tok/s | routed / routed K=1 | merged ×K ms | merged tok/s | set MiB | set / 1-adapter | merged ×K MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, rt, mt, sb, mb in rows:
        print(f"| {k} | {rt * 1e3:.1f} | {total_tokens / rt:,.0f} | {rt / first['time']:.2f} | {mt * 1e3:.1f} | "
              f"{total_tokens / mt:,.0f} | {sb / 2**20:.1f} | {sb / first['bytes']:.3f} | {mb / 2**20:.1f} |")
    print(f"\nrouted K=1 / one plain merged forward: {first['time'] / plain_time:.2f}× (factored execution of 36 targets; "
          f"B={args.batch}, S={args.seq}, {'spectral' if args.spectral else 'W0 kept'}, {jax.devices()[0].platform})")


if __name__ == "__main__":
    main()
