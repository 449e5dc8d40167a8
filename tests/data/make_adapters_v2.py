"""Writes tests/data/adapter_v2_*.safetensors with the library at main c341083 (adapter format
version 2), before the issue-19 restructuring: tests/test_adapter_format_compat.py loads them with
the current code and compares the merged weights to the ones recorded here (`merged_*.npz`).

Run once from the repository root: PYTHONPATH=. python tests/data/make_adapters_v2.py (it is not a test).
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import svft_jax
from svft_jax.baselines import dora, lora, vera
from svft_jax.checkpoint import save_adapter

HERE = pathlib.Path(__file__).parent


def base_params():
    rng = np.random.default_rng(19)
    return {
        "encoder": {
            "query": {"kernel": rng.standard_normal((16, 12)).astype(np.float32), "bias": np.zeros(12, np.float32)},
            "mlp": {"kernel": rng.standard_normal((12, 20)).astype(np.float32)},
            "stack": {"kernel": rng.standard_normal((3, 8, 10)).astype(np.float32)},
        },
        "classifier": {"kernel": rng.standard_normal((12, 3)).astype(np.float32)},
    }


def perturb(adapted, seed):
    """Non-zero trainable values so the file holds a real update (a zero init would test nothing)."""
    train, frozen = svft_jax.split(adapted)
    leaves, tree = jax.tree_util.tree_flatten(train)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.standard_normal(np.shape(x)).astype(np.asarray(x).dtype) * 0.1) for x in leaves]
    return svft_jax.combine(jax.tree_util.tree_unflatten(tree, leaves), frozen)


TARGETS = "encoder/(query|mlp|stack)/kernel"
LAYOUTS = {"encoder/stack/kernel": "stacked_in_out"}


def adapted_trees(params):
    return {
        "svft": svft_jax.apply(
            params, pattern="banded", d=1, targets=TARGETS, extra="classifier/.*",
            overrides={"encoder/mlp/kernel": {"pattern": "random", "k": 7, "d": None, "seed": 3}, "encoder/stack/kernel": {"layout": "stacked_in_out"}},
        ),
        "lora": lora.apply(params, rank=2, alpha=4.0, targets=TARGETS, layouts=LAYOUTS),
        "dora": dora.apply(params, rank=2, targets=TARGETS, layouts=LAYOUTS),
        "vera": vera.apply(params, rank=4, targets=TARGETS, layouts=LAYOUTS),
    }


if __name__ == "__main__":
    params = base_params()
    np.savez(HERE / "adapter_v2_base.npz", **{svft_jax._paths.path_to_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)})
    for i, (name, adapted) in enumerate(adapted_trees(params).items()):
        adapted = perturb(adapted, i)
        save_adapter(HERE / f"adapter_v2_{name}.safetensors", adapted, overwrite=True)
        merged = svft_jax.merge(adapted)
        np.savez(HERE / f"adapter_v2_{name}_merged.npz", **{svft_jax._paths.path_to_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(merged)})
        print(name, "written")
