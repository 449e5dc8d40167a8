"""A new method written in one file (tests/example_method.py) gets the generic verbs for free:
`size` (its plan's arrays, before any array exists), `adapt` (alone and mixed with SVFT by
typed rules), `plan(method=...)`, `summary`, split/optimizer, adapter files (save, load), and
`wrap`. Truth: the dense float64 formula W0 + diag(g) W0 + s u vᵀ, and the built arrays.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from example_method import Gain, GainNode

import svft_jax
from svft_jax.checkpoint import load_adapter, save_adapter
from svft_jax.core import METHODS


@pytest.fixture(scope="module", autouse=True)
def _registered_once():
    yield
    METHODS.unregister("example_gain")


def _params():
    g = np.random.default_rng(3)
    return {"dense": {"kernel": jnp.asarray(g.normal(size=(5, 4)), jnp.float32)},
            "mid": {"kernel": jnp.asarray(g.normal(size=(4, 4)), jnp.float32)},
            "head": {"kernel": jnp.asarray(g.normal(size=(4, 2)), jnp.float32)}}


def _model(params, x):
    h = jnp.tanh(x @ params["dense"]["kernel"])
    h = jnp.tanh(h @ params["mid"]["kernel"])
    return h @ params["head"]["kernel"]


def _trained(adapted, seed=0):
    rng = np.random.default_rng(seed)
    train, frozen = svft_jax.split(adapted)
    train = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype), train)
    return svft_jax.combine(train, frozen)


def _dense_truth(kernel, node):
    w0 = np.asarray(kernel, np.float64).T  # (d1, d2)
    g, u, v = (np.asarray(getattr(node, n), np.float64) for n in ("gain", "u", "v"))
    return (w0 + g[:, None] * w0 + node.meta.scale * np.outer(u, v)).T


def test_size_reads_the_plan_arrays_that_adapt_builds():
    params = _params()
    report = svft_jax.size(params, Gain(scale=2.0), targets="(dense|mid)/kernel")
    adapted = svft_jax.adapt(params, Gain(scale=2.0), targets="(dense|mid)/kernel")
    for row in report.rows:
        node = adapted[row.path.split("/")[0]]["kernel"]
        assert {k: (a.shape, a.dtype) for k, a in row.arrays.items()} == {
            k: (tuple(getattr(node, k).shape), np.dtype(getattr(node, k).dtype).name) for k in row.arrays}
        assert row.method == node.describe() == "gain(s=2)"
        assert row.trainable == node.num_trainable == node.layout.d1 * 2 + node.layout.d2
    # the keyword spelling through the registry: plan(method=...) builds the typed config
    assert svft_jax.plan(params, method="example_gain", scale=2.0, targets="(dense|mid)/kernel").totals == report.totals


def test_adapt_mixed_with_svft_by_rules_merges_to_the_dense_formula():
    params = _params()
    rules = [svft_jax.Rule(path="dense/kernel", method=Gain(scale=0.5)),
             svft_jax.Rule(path=".*", method=svft_jax.SVFT(pattern=svft_jax.Banded(d=1)))]
    adapted = _trained(svft_jax.adapt(params, rules, targets="(dense|mid)/kernel", extra="head/.*"))
    assert isinstance(adapted["dense"]["kernel"], GainNode)
    assert adapted["mid"]["kernel"].describe() == "svft-banded(d=1)"
    merged = svft_jax.merge(adapted)
    np.testing.assert_allclose(merged["dense"]["kernel"], _dense_truth(params["dense"]["kernel"], adapted["dense"]["kernel"]),
                               rtol=1e-5, atol=1e-5)
    # the optimizer updates exactly the trainable set: both methods' arrays and the head
    train, frozen = svft_jax.split(adapted)
    tx = svft_jax.optimizer(optax.sgd(0.1))
    state = tx.init(train)
    grads = jax.tree.map(jnp.ones_like, train)
    updates, _ = tx.update(grads, state, train)
    assert all(np.all(np.asarray(u) == -0.1) for u in jax.tree.leaves(updates))


def test_save_load_and_wrap_round_trip(tmp_path):
    params = _params()
    adapted = _trained(svft_jax.adapt(params, Gain(scale=1.5), targets="(dense|mid)/kernel"))
    path = save_adapter(tmp_path / "gain.safetensors", adapted)
    loaded = load_adapter(path, params)
    for name in ("dense", "mid"):
        for field in ("gain", "u", "v"):
            np.testing.assert_array_equal(getattr(loaded[name]["kernel"], field), getattr(adapted[name]["kernel"], field))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)
    expected = _model(svft_jax.merge(adapted), x)
    wrapped = svft_jax.wrap(_model, "factored", strict=True)
    np.testing.assert_allclose(wrapped(loaded, x), expected, rtol=1e-5, atol=1e-5)
    assert wrapped.plan(loaded, x) == {"dense/kernel": ("factored",), "mid/kernel": ("factored",)}


def test_a_rule_that_matches_nothing_raises_naming_it():
    with pytest.raises(ValueError, match=r"Rule\(path='nothing/.\*'\) matches none of the 2 targets"):
        svft_jax.adapt(_params(), [svft_jax.Rule(path="nothing/.*", method=Gain()), svft_jax.Rule(path=".*", method=Gain())],
                       targets="(dense|mid)/kernel")


def test_a_target_without_a_method_raises_naming_the_path():
    with pytest.raises(ValueError, match="parameter 'mid/kernel' is a target but no rule matches it"):
        svft_jax.adapt(_params(), [svft_jax.Rule(path="dense/.*", method=Gain())], targets="(dense|mid)/kernel")
