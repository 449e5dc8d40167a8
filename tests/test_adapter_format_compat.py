"""Adapter files written by main before the issue-19 restructuring (format version 2, made by
tests/data/make_adapters_v2.py at commit c341083) still load: the truth is the merged weights
that the writing code recorded beside each file, compared leaf by leaf.
"""

import pathlib

import numpy as np
import pytest

import svft_jax
import svft_jax.baselines  # noqa: F401  (registers lora, dora, vera at c341083)
from svft_jax.checkpoint import load_adapter

DATA = pathlib.Path(__file__).parent / "data"


def _nested(flat):
    tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


@pytest.mark.parametrize("method", ["svft", "lora", "dora", "vera"])
def test_v2_adapter_file_loads_to_the_recorded_merged_weights(method):
    with np.load(DATA / "adapter_v2_base.npz") as base:
        params = _nested(dict(base))
    with np.load(DATA / f"adapter_v2_{method}_merged.npz") as merged:
        expected = dict(merged)
    adapted = load_adapter(DATA / f"adapter_v2_{method}.safetensors", params)
    got = svft_jax.merge(adapted)
    flat = {"/".join(str(k.key) for k in p): np.asarray(x) for p, x in __import__("jax").tree_util.tree_leaves_with_path(got)}
    assert sorted(flat) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_allclose(flat[path], value, rtol=1e-5, atol=1e-5, err_msg=path)
    # The file really carried an update: the merged weights differ from the base somewhere.
    assert any(not np.allclose(flat[p], np.asarray(v)) for p, v in dict(np.load(DATA / "adapter_v2_base.npz")).items())
