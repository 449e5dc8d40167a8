"""Merged exports load into the unmodified Hugging Face Flax model and reproduce its outputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers

import svft_jax
from svft_jax.checkpoint import (
    load_merged,
    load_merged_safetensors,
    save_merged,
    save_merged_safetensors,
)
from tests.stack import needs_flax_models

TARGETS = r".*attention/self/(query|value)/kernel|.*intermediate/dense/kernel"


@pytest.fixture(scope="module")
def tiny_bert():
    """A 2-layer random BERT, SVFT on q/v/MLP with trained-looking (non-zero) M."""
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=32)
    # Random numbers in the model's parameter shapes: running the model's init (eagerly or
    # jitted) compiles hundreds of ops, and any weights do for an export test.
    model = transformers.FlaxBertModel(config, _do_init=False)
    g = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(g.normal(size=s.shape) * 0.2, s.dtype), model.params_shape_tree)
    forward = jax.jit(lambda p, ids: model(ids, params=p).last_hidden_state)
    adapted = svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy")
    adapted = jax.tree_util.tree_map(
        lambda x: dataclasses.replace(x, m=jnp.asarray(g.normal(size=x.m.shape) * 0.5, jnp.float32)) if svft_jax.is_node(x) else x,
        adapted, is_leaf=svft_jax.is_node)
    input_ids = jnp.asarray(g.integers(0, 64, size=(2, 7)), jnp.int32)
    merged = jax.jit(svft_jax.merge)(adapted)
    reference = forward(merged, input_ids)
    # The adapter really changes the model (else equal outputs would prove nothing).
    assert not np.allclose(reference, forward(params, input_ids), atol=1e-3)
    return forward, config, adapted, merged, input_ids, np.asarray(reference)


@needs_flax_models
def test_orbax_merged_export_reproduces_the_adapted_model(tiny_bert, tmp_path):
    forward, _, adapted, merged, input_ids, reference = tiny_bert
    path = save_merged(tmp_path / "merged", adapted)
    restored = load_merged(path)  # plain Orbax restore, no template
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(merged)
    outputs = forward(restored, input_ids)
    np.testing.assert_allclose(np.asarray(outputs), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_merged(path, adapted)
    save_merged(path, jax.tree_util.tree_map(lambda x: x * 0 + 2.0, merged), overwrite=True)
    replaced = load_merged(path, template=merged)
    assert all(np.all(np.asarray(x) == 2.0) for x in jax.tree_util.tree_leaves(replaced))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # staging dirs cleaned up


@needs_flax_models
def test_safetensors_export_loads_with_hf_from_pretrained(tiny_bert, tmp_path):
    forward, config, adapted, _, input_ids, reference = tiny_bert
    config.save_pretrained(tmp_path)
    save_merged_safetensors(tmp_path / "model.safetensors", adapted)  # HF's Flax file name and naming
    # transformers' own loader parses the file (it checks the header's "format" and names).
    _, reloaded_params = transformers.FlaxBertModel.from_pretrained(tmp_path, _do_init=False)
    outputs = forward(reloaded_params, input_ids)
    np.testing.assert_allclose(np.asarray(outputs), reference, rtol=1e-5, atol=1e-5)


@needs_flax_models
@pytest.mark.parametrize("sep", [".", "/"])
def test_safetensors_round_trip_is_exact_and_readable_by_the_safetensors_library(tiny_bert, tmp_path, sep):
    _, _, adapted, merged, _, _ = tiny_bert
    path = save_merged_safetensors(tmp_path / "m.safetensors", adapted, sep=sep)
    loaded = load_merged_safetensors(path)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(merged)
    for want, got in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(loaded), strict=True):
        assert np.array_equal(np.asarray(want), got)
    flat = safetensors.numpy.load_file(str(path))
    query = sep.join(["encoder", "layer", "0", "attention", "self", "query", "kernel"])
    assert np.array_equal(flat[query], np.asarray(merged["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]))


def test_bfloat16_params_survive_the_safetensors_export(tmp_path):
    g = np.random.default_rng(0)
    params = {"proj": {"kernel": jnp.asarray(g.normal(size=(6, 4)), jnp.bfloat16)}}
    adapted = svft_jax.apply(params, "plain", svd_backend="numpy")
    path = save_merged_safetensors(tmp_path / "bf16.safetensors", adapted)
    loaded = load_merged_safetensors(path)["proj"]["kernel"]
    assert loaded.dtype == jnp.bfloat16
    assert np.array_equal(loaded.view(np.uint16), np.asarray(svft_jax.merge(adapted)["proj"]["kernel"]).view(np.uint16))
