"""Adapter file size for a BERT-base-shaped model, next to the full model.

    python -m experiments.bench.adapter_size [--layers=12] [--json=out.json]

Builds a random parameter pytree with BERT-base shapes (hidden 768, 12 layers, intermediate
3072, vocab 30522; ≈110M params — no real model needed, the sizes depend on shapes only),
applies SVFT to q/k/v/o and both MLP kernels (plain, then banded d=2), and writes with
`svft_jax.checkpoint`: the adapter file, the factor cache and the merged safetensors export.
Prints a table of byte sizes (and writes JSON with --json). Files go to a temp dir.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import svft_jax
from experiments.harness import config as config_lib
from svft_jax.checkpoint import save_adapter, save_factor_cache, save_merged_safetensors

TARGETS = r".*attention/self/(query|key|value)/kernel|.*attention/output/dense/kernel|.*(intermediate|output)/dense/kernel"


def bert_base_params(layers: int = 12, hidden: int = 768, intermediate: int = 3072, vocab: int = 30522, seed: int = 0):
    """Random float32 params in FlaxBertModel's layout (kernels are (in, out))."""
    g = np.random.default_rng(seed)

    def dense(n_in, n_out):
        return {"kernel": (g.standard_normal((n_in, n_out), np.float32) * 0.02), "bias": np.zeros(n_out, np.float32)}

    def norm():
        return {"scale": np.ones(hidden, np.float32), "bias": np.zeros(hidden, np.float32)}

    layer = {}
    for i in range(layers):
        layer[str(i)] = {
            "attention": {"self": {"query": dense(hidden, hidden), "key": dense(hidden, hidden), "value": dense(hidden, hidden)},
                          "output": {"dense": dense(hidden, hidden), "LayerNorm": norm()}},
            "intermediate": {"dense": dense(hidden, intermediate)},
            "output": {"dense": dense(intermediate, hidden), "LayerNorm": norm()},
        }
    return {
        "embeddings": {"word_embeddings": {"embedding": g.standard_normal((vocab, hidden), np.float32) * 0.02},
                       "position_embeddings": {"embedding": g.standard_normal((512, hidden), np.float32) * 0.02},
                       "token_type_embeddings": {"embedding": g.standard_normal((2, hidden), np.float32) * 0.02},
                       "LayerNorm": norm()},
        "encoder": {"layer": layer},
        "pooler": {"dense": dense(hidden, hidden)},
    }


@dataclasses.dataclass(frozen=True)
class Options:
    """layers: BERT-base layers; json: also write the results here."""

    layers: int = 12
    json: str | None = None


def main(argv=None) -> dict:
    (args,) = config_lib.parse(argv, Options(), description=__doc__)

    params = bert_base_params(args.layers)
    full_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    full_bytes = full_params * 4
    results = {"model": f"BERT-base shapes, {args.layers} layers", "full_params": int(full_params),
               "full_float32_bytes": int(full_bytes), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, kwargs in [("plain", dict(pattern="plain")), ("banded d=2", dict(pattern="banded", d=2))]:
            start = time.perf_counter()
            adapted = svft_jax.apply(params, targets=TARGETS, svd_backend="numpy", **kwargs)
            apply_seconds = time.perf_counter() - start
            counts = svft_jax.count_parameters(adapted)
            adapter = save_adapter(tmp / f"{kwargs['pattern']}.safetensors", adapted)  # the node records its SVD back-end
            run = {"config": name, "targets": counts["targets"], "trainable_params": counts["trainable"],
                   "adapter_bytes": adapter.stat().st_size, "apply_seconds": round(apply_seconds, 1)}
            if kwargs["pattern"] == "plain":
                cache = save_factor_cache(tmp / "factors.safetensors", adapted)
                merged = save_merged_safetensors(tmp / "merged.safetensors", adapted)
                run["factor_cache_bytes"] = cache.stat().st_size
                run["merged_safetensors_bytes"] = merged.stat().st_size
            run["adapter_over_full"] = run["adapter_bytes"] / full_bytes
            results["runs"].append(run)
            del adapted

    print(f"{results['model']}: {full_params / 1e6:.1f}M params, {full_bytes / 2**20:.1f} MiB as float32")
    for run in results["runs"]:
        extra = ""
        if "factor_cache_bytes" in run:
            extra = f", factor cache {run['factor_cache_bytes'] / 2**20:.1f} MiB, merged export {run['merged_safetensors_bytes'] / 2**20:.1f} MiB"
        print(f"  {run['config']:<11} {run['trainable_params']:>8,} trainable  adapter {run['adapter_bytes'] / 1024:8.1f} KiB"
              f" ({100 * run['adapter_over_full']:.3f}% of the model){extra}  [apply {run['apply_seconds']} s]")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
