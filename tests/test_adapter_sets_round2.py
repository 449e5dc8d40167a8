"""Adapter sets, round two of "no silent failures" (issue 21: items 1, 2, 5, 7 and 12's bank).

Truths checked:
  * an adapter set varies only the SVFT coefficients: an adapter whose other leaves (a head it
    trained with `extra=`, or a leaf trained on an unmarked tree) differ from the set's is
    refused, naming the leaf, so no adapter ever runs with another one's head; a one-adapter
    set's `insert` carries the new head (bit-identical) into select, extract and the saved file;
  * `load(save(tree))` gives back exactly the saved names in bank order (after `remove` and
    after a reorder), and a file the index does not name is never loaded;
  * out-of-range routing ids traced inside `jit` poison their example's output with NaN, while
    the other examples equal their own merged model (never the base model silently);
  * non-finite mixing weights, an adapter of another base in a one-adapter `insert`, a damaged
    index and an unsavable name are refused before anything is written;
  * mixing weights restored with `frozen=` are tied to the bank they were trained over.
"""

from __future__ import annotations

import dataclasses
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svft_jax
import svft_jax.adapters as adapters
from svft_jax.checkpoint import TrainCheckpointer


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(nn.gelu(nn.Dense(16, name="body")(x)))


def _randomize(adapted, seed, head=True):
    """M (and, with `head`, every `Trainable` leaf: a trained head) drawn at random."""
    g = np.random.default_rng(seed)

    def draw(x):
        if svft_jax.is_node(x):
            return dataclasses.replace(x, m=jnp.asarray(g.normal(size=x.m.shape) * 0.5, jnp.float32))
        if head and isinstance(x, svft_jax.Trainable):
            return svft_jax.Trainable(jnp.asarray(g.normal(size=x.value.shape), x.value.dtype))
        return x

    return jax.tree_util.tree_map(draw, adapted, is_leaf=lambda x: svft_jax.is_node(x) or isinstance(x, svft_jax.Trainable))


@pytest.fixture(scope="module")
def task():
    model = Classifier()
    params = model.init(jax.random.key(0), jnp.ones((1, 12)))["params"]
    adapt = lambda **kw: svft_jax.apply(params, "banded", d=1, targets="body/kernel", svd_backend="numpy", **kw)  # noqa: E731
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    return params, adapt, apply


def _head(tree):
    head = svft_jax.merge(tree)["head"] if any(svft_jax.is_node(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=svft_jax.is_node)) else tree["head"]
    return {k: np.asarray(v) for k, v in head.items()}


# ---- item 1: each adapter's own trained head --------------------------------------------------


def test_an_adapter_with_its_own_trained_head_is_refused_naming_the_leaf(task):
    _, adapt, _ = task
    a = _randomize(adapt(extra="head/.*"), 1)
    b = _randomize(adapt(extra="head/.*"), 2)  # another task: its own M and its own head
    tree = adapters.create(a, "a")
    with pytest.raises(ValueError, match=r"head/(bias|kernel).*extract"):
        adapters.add(tree, "b", b)
    two = adapters.add(tree, "c", None)
    with pytest.raises(ValueError, match=r"head/(bias|kernel)"):
        adapters.insert(two, "c", b)  # K ≥ 2: the head is shared by 'a'
    # A head trained on an unmarked tree (the legacy split(extra=) path) is caught the same way.
    legacy = jax.tree_util.tree_map(lambda x: x, adapt())
    legacy = {**legacy, "head": {**legacy["head"], "kernel": legacy["head"]["kernel"] + 1.0}}
    with pytest.raises(ValueError, match="head/kernel"):
        adapters.add(adapters.create(adapt(), "a"), "b", legacy)


def test_adapters_sharing_one_head_keep_it_bit_identical_in_select_extract_and_files(task, tmp_path):
    params, adapt, apply = task
    a = _randomize(adapt(extra="head/.*"), 1)
    b = _randomize(a, 2, head=False)  # the same (frozen) head, its own M
    tree = adapters.add(adapters.create(a, "a"), "b", b)
    x = jax.random.normal(jax.random.key(1), (4, 12))
    for name, single in (("a", a), ("b", b)):
        assert all(np.array_equal(_head(adapters.select(tree, name))[k], _head(single)[k]) for k in ("kernel", "bias"))
        np.testing.assert_allclose(apply(svft_jax.merge(adapters.select(tree, name)), x), apply(svft_jax.merge(single), x), atol=2e-5)
    # A one-adapter set owns its head: insert carries the retrained one everywhere.
    retrained = _randomize(a, 3)
    one = adapters.insert(adapters.create(a, "a"), "a", retrained)
    for view in (adapters.select(one, "a"), adapters.extract(one, "a")):
        assert all(np.array_equal(_head(view)[k], _head(retrained)[k]) for k in ("kernel", "bias"))
    adapters.save(tmp_path / "one", one)
    loaded = svft_jax.checkpoint.load_adapter(tmp_path / "one" / "a.safetensors", params)
    assert all(np.array_equal(_head(loaded)[k], _head(retrained)[k]) for k in ("kernel", "bias"))


# ---- item 2: re-saving a set ----------------------------------------------------------------


def test_resaving_gives_back_exactly_the_saved_names_in_bank_order(task, tmp_path):
    params, adapt, apply = task
    singles = {n: _randomize(adapt(), s, head=False) for s, n in enumerate("abc", 1)}
    tree = adapters.create(singles["a"], "a")
    for n in "bc":
        tree = adapters.add(tree, n, singles[n])
    folder = tmp_path / "set"
    adapters.save(folder, tree)
    smaller = adapters.remove(tree, "b")
    adapters.save(folder, smaller, overwrite=True)
    assert adapters.names(adapters.load(folder, params)) == ("a", "c")  # 'b' stays removed
    reordered = adapters.add(adapters.remove(smaller, "a"), "a", singles["a"])  # bank order (c, a)
    adapters.save(folder, reordered, overwrite=True)
    loaded = adapters.load(folder, params)
    assert adapters.names(loaded) == ("c", "a")
    x = jax.random.normal(jax.random.key(2), (2, 12))
    wrapped = svft_jax.wrap(apply, strategy="routed")
    ids = jnp.array([0, 1])  # routing ids keep meaning what they meant when saved
    want = np.stack([np.asarray(apply(svft_jax.merge(singles[n]), x[i:i + 1]))[0] for i, n in enumerate("ca")])
    np.testing.assert_allclose(wrapped(adapters.route(loaded, ids), x), want, atol=2e-5)
    assert (folder / "b.safetensors").exists()  # a file the index does not name is never loaded
    with pytest.raises(ValueError, match="holds no adapter 'b'"):
        adapters.load(folder, params, only="b")
    # `only` saves those adapters, in bank order, and the index names exactly them.
    adapters.save(folder, tree, only=["c", "a"], overwrite=True)
    assert adapters.names(adapters.load(folder, params)) == ("a", "c")


def test_saving_over_another_sets_index_needs_overwrite_and_writes_nothing(task, tmp_path):
    _, adapt, _ = task
    folder = tmp_path / "set"
    adapters.save(folder, adapters.create(adapt(), "old"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(FileExistsError, match="adapters.json"):
        adapters.save(folder, adapters.create(adapt(), "new"))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ---- item 5: traced out-of-range routing ids --------------------------------------------------


def test_traced_out_of_range_routing_ids_poison_their_row_under_jit(task):
    params, adapt, apply = task
    singles = {n: _randomize(adapt(), s, head=False) for s, n in enumerate("ab", 1)}
    tree = adapters.add(adapters.create(singles["a"], "a"), "b", singles["b"])
    x = jax.random.normal(jax.random.key(3), (5, 12))
    run = jax.jit(lambda t, ids, x: svft_jax.wrap(apply, strategy="routed")(adapters.route(t, ids), x))
    y = np.asarray(run(tree, jnp.array([1, 2, -1, -2, 0]), x))
    assert np.all(np.isnan(y[[1, 3]]))  # ids 2 (≥ K) and -2: visible, not the base model
    for row, model in ((0, singles["b"]), (2, None), (4, singles["a"])):
        merged = params if model is None else svft_jax.merge(model)
        np.testing.assert_allclose(y[row], np.asarray(apply(merged, x[row:row + 1]))[0], atol=2e-5)


# ---- item 7: refusals with the file, argument and fix -----------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_mixing_weights_are_refused(task, bad):
    _, adapt, _ = task
    tree = adapters.add(adapters.create(adapt(), "a"), "b", adapt())
    with pytest.raises(ValueError, match="'b'.*finite"):
        adapters.mix(tree, {"a": 0.5, "b": bad})
    with pytest.raises(ValueError, match="'b'.*finite"):
        adapters.combine(tree, {"a": 1.0, "b": bad}, "ab")
    with pytest.raises(ValueError, match="with_weights.*finite"):
        adapters.with_weights(tree, np.array([0.5, bad]))
    with pytest.raises(ValueError, match="with_weights.*finite"):
        adapters.with_weights(tree, np.array([[1.0, 0.0], [0.0, bad]]))
    with pytest.raises(TypeError, match="'a'.*number"):
        adapters.mix(tree, {"a": "half"})


def test_insert_into_a_one_adapter_set_checks_the_base_as_a_larger_set_does(task):
    params, adapt, _ = task
    one = adapters.create(adapt(), "a")
    other = Classifier().init(jax.random.key(7), jnp.ones((1, 12)))["params"]
    foreign = svft_jax.apply(other, "banded", d=1, targets="body/kernel", svd_backend="numpy")
    for tree in (one, adapters.add(one, "b", None)):
        with pytest.raises(ValueError, match="other singular vectors"):
            adapters.insert(tree, "a", foreign)
        with pytest.raises(ValueError, match="other targets"):
            adapters.insert(tree, "a", svft_jax.apply(params, "plain", targets="head/kernel", svd_backend="numpy"))


@pytest.mark.parametrize("text", ['{"adapters": ["a", ', "[1, 2]", '{"order": ["a"]}', '{"adapters": ["a", 3]}', ""])
def test_a_damaged_index_is_refused_naming_the_file(task, tmp_path, text):
    params, adapt, _ = task
    folder = tmp_path / "set"
    adapters.save(folder, adapters.create(adapt(), "a"))
    (folder / "adapters.json").write_text(text)
    with pytest.raises(ValueError, match="adapters.json"):
        adapters.load(folder, params)
    with pytest.raises(FileExistsError, match="adapters.json"):
        adapters.save(folder, adapters.create(adapt(), "b"))
    adapters.save(folder, adapters.create(adapt(), "b"), overwrite=True)  # the repair the message names
    assert adapters.names(adapters.load(folder, params)) == ("b",)


def test_every_name_is_validated_before_any_file_is_written(task, tmp_path):
    _, adapt, _ = task
    tree = adapters.add(adapters.create(adapt(), "a"), "sub/b", adapt())
    folder = tmp_path / "set"
    for bad in ("sub/b", ".hidden", "a\\b", "nul\x00"):
        named = adapters.add(adapters.create(adapt(), "a"), bad, adapt())
        with pytest.raises(ValueError, match=re.escape(repr(bad)) + ".*file name"):
            adapters.save(folder, named)
        assert not folder.exists() or not os.listdir(folder)
    with pytest.raises(ValueError, match="file name"):
        adapters.save(folder, tree, only=["a", "sub/b"])
    assert not folder.exists() or not os.listdir(folder)


# ---- item 12: mixing weights and the frozen bank ------------------------------------------------


def test_mixing_weights_restore_only_onto_the_bank_they_were_trained_over(task, tmp_path):
    _, adapt, _ = task
    singles = {n: _randomize(adapt(), s, head=False) for s, n in enumerate("abc", 1)}
    tree = adapters.mix(adapters.add(adapters.create(singles["a"], "a"), "b", singles["b"]), {"a": 0.3, "b": 0.7})
    trainable, frozen = svft_jax.split(tree)
    writer = TrainCheckpointer(tmp_path / "ckpt", frozen=frozen)
    writer.save(1, trainable)
    writer.close()
    same = TrainCheckpointer(tmp_path / "ckpt", frozen=frozen, read_only=True).restore(1, trainable)
    for got, want in zip(jax.tree_util.tree_leaves(same.trainable), jax.tree_util.tree_leaves(trainable), strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    # Same names, same Ω, same base, but adapter 'b' retrained: the weights meant another mix.
    retrained = adapters.insert(tree, "b", singles["c"])
    other_trainable, other_frozen = svft_jax.split(retrained)
    reader = TrainCheckpointer(tmp_path / "ckpt", frozen=other_frozen, read_only=True)
    with pytest.raises(ValueError, match="body/kernel.*bank"):
        reader.restore(1, other_trainable)



def test_a_step_saved_before_the_bank_was_fingerprinted_restores_with_a_warning(task, tmp_path, monkeypatch):
    _, adapt, _ = task
    tree = adapters.add(adapters.create(_randomize(adapt(), 1, head=False), "a"), "b", adapt())
    trainable, frozen = svft_jax.split(tree)
    with monkeypatch.context() as old_version:  # what svft-jax recorded before the bank fingerprint
        old_version.delattr(adapters.AdapterSetNode, "bank_fingerprint")
        writer = TrainCheckpointer(tmp_path / "ckpt", frozen=frozen)
        writer.save(1, trainable)
        writer.close()
    with pytest.warns(svft_jax.checkpoint.CheckpointWarning, match="bank_sha256"):
        restored = TrainCheckpointer(tmp_path / "ckpt", frozen=frozen, read_only=True).restore(1, trainable)
    assert restored.step == 1
