"""Adapter sets (svft_jax.adapters): many SVFT adapters over one frozen base.

Truths checked:
  * one selected adapter / the base model / a mixture equals the float64 dense reference
    (tests/reference.py) of W0 + U (Σ_k w_k M_k) Vᵀ built from each adapter's own node;
  * per-example routing in one batch equals running each example through its own merged
    model (linen MLP, tiny FlaxBert, tiny FlaxLlama), with ids including -1 (the base);
  * switching adapters between calls of a jitted function does not retrace (a trace counter);
  * training one extracted adapter leaves the others bit-identical and its gradient is the
    float64 Ω-gradient (UᵀGV read at Ω);
  * the mixing-weight gradient is ⟨G, ΔW_k⟩ (ΔW is linear in M);
  * save/load round trip through ordinary adapter files.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

import svft_jax
import svft_jax.adapters as adapters
import svft_jax.models as svft_models
from tests import reference
from tests.stack import needs_flax_models


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.gelu(nn.Dense(24)(x)))


def _randomize(adapted, seed, scale=0.5):
    g = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: dataclasses.replace(x, m=jnp.asarray(g.normal(size=x.m.shape) * scale, jnp.float32)) if svft_jax.is_node(x) else x,
        adapted, is_leaf=svft_jax.is_node)


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 12)))["params"]
    a = _randomize(svft_jax.apply(params, "banded", d=1, svd_backend="numpy"), 1)
    b = _randomize(svft_jax.apply(params, "plain", svd_backend="numpy"), 2)
    c = _randomize(svft_jax.apply(params, "banded", d=1, svd_backend="numpy"), 3)
    tree = adapters.add(adapters.add(adapters.create(a, "a"), "b", b), "c", c)
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    return model, params, {"a": a, "b": b, "c": c}, tree, apply


def _kernels(tree):
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=svft_jax.is_node)[0]:
        if svft_jax.is_node(x):
            out["/".join(str(k.key) for k in path)] = x
    return out


def test_one_copy_of_factors_shared_by_all_adapters(mlp):
    _, _, singles, tree, _ = mlp
    for path, node in _kernels(tree).items():
        assert node.u is _kernels(singles["a"])[path].u and node.base is _kernels(singles["a"])[path].base
        assert node.bank.shape[0] == 3
    assert adapters.names(tree) == ("a", "b", "c")
    text = adapters.summary(tree, print_fn=None)
    assert "banded(d=1)" in text and "plain" in text and "3 adapters on one base" in text


def test_select_mix_and_base_match_float64_reference(mlp):
    _, params, singles, tree, _ = mlp
    weights = {"a": 0.7, "b": -0.4, "c": 1.3}
    for active in ("a", "b", "c", None, weights):
        merged = svft_jax.merge(adapters.mix(tree, active) if isinstance(active, dict) else adapters.select(tree, active))
        for path in _kernels(singles["a"]):
            layer = path.split("/")[0]
            want = reference.f64(params[layer]["kernel"]).T
            for name, w in ({} if active is None else {active: 1.0} if isinstance(active, str) else weights).items():
                own = _kernels(singles[name])[path]
                want = want + w * (reference.weight(own) - reference.f64(own.base).T)
            np.testing.assert_allclose(np.asarray(merged[layer]["kernel"], np.float64).T, want, atol=2e-5)
    base = svft_jax.merge(adapters.select(tree, None))
    for layer in params:
        assert np.array_equal(np.asarray(base[layer]["kernel"]), np.asarray(params[layer]["kernel"]))  # M = 0: W0 exactly


def test_hot_swap_does_not_retrace(mlp):
    _, _, singles, tree, apply = mlp
    traces = []

    def forward(t, x):
        traces.append(1)
        return svft_jax.wrap(apply, strategy="routed")(t, x)

    fast = jax.jit(forward)
    x = jax.random.normal(jax.random.key(1), (4, 12))
    outs = {}
    for name in ("a", "b", "c", None, "a"):
        outs[name] = fast(adapters.select(tree, name), x)
    fast(adapters.mix(tree, {"a": 0.5, "c": 0.5}), x)
    assert len(traces) == 1
    for name in ("a", "b", "c"):
        np.testing.assert_allclose(outs[name], apply(svft_jax.merge(singles[name]), x), atol=2e-5)
    fast(adapters.route(tree, jnp.array([0, 1, 2, -1])), x)
    fast(adapters.route(tree, jnp.array([2, 2, 0, 1])), x)
    assert len(traces) == 2  # routed weights (B, K) are one more shape, then data again
    inside = jax.jit(lambda t, ids, x: svft_jax.wrap(apply, strategy="routed")(adapters.route(t, ids), x))
    np.testing.assert_allclose(inside(tree, jnp.array([0, 1, 2, -1]), x),
                               fast(adapters.route(tree, jnp.array([0, 1, 2, -1])), x), atol=1e-6)  # traced ids


def _per_example(apply, singles, base_params, xs, ids, names):
    rows = []
    for b, i in enumerate(ids):
        params = base_params if i < 0 else svft_jax.merge(singles[names[i]])
        rows.append(np.asarray(apply(params, xs[b:b + 1]))[0])
    return np.stack(rows)


@pytest.mark.parametrize("mixing", ["diagonals", "scatter"])
def test_routing_linen_mlp_equals_each_example_through_its_own_merged_model(mlp, mixing, monkeypatch):
    import svft_jax.adapters._node as node_module  # the threshold between the two mixing paths

    monkeypatch.setattr(node_module, "MAX_DIAGONALS", 32 if mixing == "diagonals" else 0)
    _, params, singles, tree, apply = mlp
    ids = np.array([2, 0, -1, 1, 0, 2])
    x = jax.random.normal(jax.random.key(2), (6, 12))
    wrapped = svft_jax.wrap(apply, strategy="routed")
    y = jax.jit(wrapped)(adapters.route(tree, ids), x)
    assert set(wrapped.last_plan.values()) == {("routed",)}  # no dense weight formed
    np.testing.assert_allclose(y, _per_example(apply, singles, params, x, ids, adapters.names(tree)), atol=2e-5)


def _hf_case(model_cls, config, targets, seed):
    model = model_cls(config, _do_init=False)
    g = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(g.normal(size=s.shape) * 0.2, s.dtype), model.params_shape_tree)
    singles = {n: _randomize(svft_jax.apply(params, pat, d=1 if pat == "banded" else None, targets=targets, svd_backend="numpy"), i + seed)
               for i, (n, pat) in enumerate((("x", "banded"), ("y", "plain"), ("z", "banded")))}
    tree = adapters.create(singles["x"], "x")
    for n in ("y", "z"):
        tree = adapters.add(tree, n, singles[n])
    return model, params, singles, tree


@needs_flax_models
@pytest.mark.parametrize("family", ["bert", pytest.param("llama", marks=pytest.mark.slow)])
def test_routing_hf_models_equals_each_example_through_its_own_merged_model(family):
    if family == "bert":
        config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=24, max_position_embeddings=32)
        model, params, singles, tree = _hf_case(transformers.FlaxBertModel, config, svft_models.default_targets("bert"), 10)
    else:
        config = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
        model, params, singles, tree = _hf_case(transformers.FlaxLlamaModel, config, svft_models.default_targets("llama"), 20)
    apply = lambda p, ids: model(ids, params=p).last_hidden_state  # noqa: E731
    ids = np.array([1, -1, 2, 0])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, size=(4, 5)), jnp.int32)
    wrapped = svft_jax.wrap(apply, strategy="routed")
    y = jax.jit(wrapped)(adapters.route(tree, ids), tokens)
    assert all("routed" in used for used in wrapped.last_plan.values())
    want = _per_example(jax.jit(apply), singles, params, tokens, ids, adapters.names(tree))
    assert not np.allclose(want[0], want[2], atol=1e-3)  # the adapters really differ
    np.testing.assert_allclose(y, want, atol=1e-4)


def test_routed_set_cannot_be_merged(mlp):
    _, _, _, tree, _ = mlp
    with pytest.raises(ValueError, match="strategy='routed'"):
        svft_jax.merge(adapters.route(tree, jnp.array([0, 1])))
    with pytest.raises(ValueError, match="out of range"):
        adapters.route(tree, jnp.array([0, 3]))
    with pytest.raises(ValueError, match="leading axis"):
        svft_jax.wrap(mlp[4], strategy="routed")(adapters.route(tree, jnp.array([0, 1, 2])), jnp.ones((2, 12)))


def test_combine_is_the_dense_sum_of_deltas_on_the_union_of_omega(mlp):
    _, _, singles, tree, _ = mlp
    weights = {"a": 0.25, "b": 2.0}
    combined = adapters.combine(tree, weights, "ab")
    assert adapters.names(combined) == ("a", "b", "c", "ab")
    one = adapters.extract(combined, "ab")  # an ordinary SVFT tree on Ω_a ∪ Ω_b
    assert adapters.names(adapters.combine(tree, {"a": 1.0, "c": -1.0}, "a-c")) [-1] == "a-c"  # same Ω: an ordinary banded adapter
    same = _kernels(adapters.extract(adapters.combine(tree, {"a": 1.0, "c": -1.0}, "a-c"), "a-c"))
    for path, node in same.items():
        assert node.meta == _kernels(singles["a"])[path].meta
        np.testing.assert_allclose(node.m, _kernels(singles["a"])[path].m - _kernels(singles["c"])[path].m, atol=1e-6)
    for path, node in _kernels(one).items():
        assert isinstance(node, svft_jax.SVFTNode)
        want = sum(w * (reference.weight(_kernels(singles[n])[path]) - reference.f64(node.base).T) for n, w in weights.items())
        np.testing.assert_allclose(reference.weight(node) - reference.f64(node.base).T, want, atol=1e-5)
        np.testing.assert_allclose(np.asarray(node.delta(), np.float64), want, atol=2e-5)


def test_transformer2_mix_scales_singular_values_of_plain_adapters():
    params = MLP().init(jax.random.key(4), jnp.ones((1, 12)))["params"]
    p = _randomize(svft_jax.apply(params, "plain", svd_backend="numpy"), 5, scale=0.3)
    q = _randomize(svft_jax.apply(params, "plain", svd_backend="numpy"), 6, scale=0.3)
    tree = adapters.add(adapters.create(p, "p"), "q", q)
    alphas = {"p": 0.6, "q": 0.9}  # Σα = 1.5: the base spectrum is rescaled too
    mixed = svft_jax.merge(adapters.select(adapters.transformer2_mix(tree, alphas, "t2"), "t2"))
    for path, node_p in _kernels(p).items():
        node_q = _kernels(q)[path]
        s = reference.f64(node_p.s)
        z = alphas["p"] * (1 + reference.f64(node_p.m) / s) + alphas["q"] * (1 + reference.f64(node_q.m) / s)
        u, v = reference.f64(node_p.u), reference.f64(node_p.v)
        want = u @ np.diag(s * z) @ v.T  # full rank: W0 = U diag(s) Vᵀ
        layer = path.split("/")[0]
        np.testing.assert_allclose(np.asarray(mixed[layer]["kernel"], np.float64).T, want, atol=3e-5)
    banded = adapters.add(tree, "band", _randomize(svft_jax.apply(params, "banded", d=1, svd_backend="numpy"), 7))
    # beside a banded adapter the bank lives on a larger union Ω; the mix is the same
    beside = svft_jax.merge(adapters.select(adapters.transformer2_mix(banded, alphas, "t2"), "t2"))
    for layer in params:
        np.testing.assert_allclose(beside[layer]["kernel"], mixed[layer]["kernel"], atol=1e-6)
    with pytest.raises(ValueError, match="plain"):
        adapters.transformer2_mix(banded, {"p": 0.5, "band": 0.5}, "bad")


def test_train_one_adapter_while_the_others_stay_frozen(mlp):
    _, _, singles, tree, apply = mlp
    x = jax.random.normal(jax.random.key(5), (8, 12))
    target = jax.random.normal(jax.random.key(6), (8, 10))
    active = adapters.extract(tree, "b")
    trainable, frozen = svft_jax.split(active)
    tx = svft_jax.optimizer(optax.sgd(0.1))
    state = tx.init(trainable)

    def loss(tr):
        return jnp.mean((apply(svft_jax.merge(svft_jax.combine(tr, frozen)), x) - target) ** 2)

    grads = jax.grad(loss)(trainable)
    # The gradient of m is (Uᵀ G_W V) at Ω, G_W the gradient of the merged kernel (float64).
    merged = svft_jax.merge(active)
    g_kernel = jax.grad(lambda p: jnp.mean((apply(p, x) - target) ** 2))(merged)
    for path, node in _kernels(active).items():
        layer = path.split("/")[0]
        want = reference.omega_gradient(node, g_kernel[layer]["kernel"])
        np.testing.assert_allclose(np.asarray(_kernels(grads)[path].m), want, rtol=1e-4, atol=1e-7)
    updates, state = tx.update(grads, state, trainable)
    trained = svft_jax.combine(optax.apply_updates(trainable, updates), frozen)
    assert loss(svft_jax.split(trained)[0]) < loss(trainable)
    after = adapters.insert(tree, "b", trained)
    assert adapters.names(after) == adapters.names(tree)
    for name in ("a", "c"):
        for path, node in _kernels(adapters.extract(after, name)).items():
            assert np.array_equal(np.asarray(node.m), np.asarray(_kernels(singles[name])[path].m))
    for path, node in _kernels(adapters.extract(after, "b")).items():
        assert np.array_equal(np.asarray(node.m), np.asarray(_kernels(trained)[path].m))


def test_mixing_weights_are_the_trainable_field_and_their_gradient_is_linear(mlp):
    _, _, singles, tree, _ = mlp
    trainable, _ = svft_jax.split(tree)
    leaves = [x for x in jax.tree_util.tree_leaves(trainable) if x is not None]
    assert all(leaf.shape == (3,) for leaf in leaves)  # only the weights train; banks and factors are frozen
    g = np.random.default_rng(8)
    probes = {p: g.normal(size=n.kernel_shape) for p, n in _kernels(tree).items()}

    def score(t):
        merged = svft_jax.merge(t)
        return sum(jnp.sum(merged[p.split("/")[0]]["kernel"] * probes[p]) for p in probes)

    grad = jax.grad(score)(adapters.select(tree, "a"))
    for path, node in _kernels(grad).items():
        for k, name in enumerate(adapters.names(tree)):
            own = _kernels(singles[name])[path]
            want = np.sum((reference.weight(own) - reference.f64(own.base).T).T * probes[path])
            np.testing.assert_allclose(float(node.weights[k]), want, rtol=1e-4, atol=1e-4)


def test_save_and_load_round_trip_through_adapter_files(mlp, tmp_path):
    _, params, singles, tree, apply = mlp
    written = adapters.save(tmp_path / "set", tree)
    assert sorted(p.name for p in written) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    loaded = adapters.load(tmp_path / "set", params)
    assert adapters.names(loaded) == ("a", "b", "c")
    x = jax.random.normal(jax.random.key(9), (3, 12))
    wrapped = svft_jax.wrap(apply, strategy="routed")
    ids = jnp.array([2, 1, 0])
    np.testing.assert_allclose(wrapped(adapters.route(loaded, ids), x), wrapped(adapters.route(tree, ids), x), atol=1e-6)
    alone = svft_jax.checkpoint.load_adapter(tmp_path / "set" / "b.safetensors", params)  # an ordinary adapter file
    np.testing.assert_allclose(apply(svft_jax.merge(alone), x), apply(svft_jax.merge(singles["b"]), x), atol=1e-6)
    only = adapters.load(tmp_path / "set", params, only=["c"])
    assert adapters.names(only) == ("c",)


def test_wrong_inputs_raise_with_the_fix(mlp):
    _, params, singles, tree, _ = mlp
    with pytest.raises(ValueError, match="already holds"):
        adapters.add(tree, "a", singles["a"])
    other = MLP().init(jax.random.key(11), jnp.ones((1, 12)))["params"]
    with pytest.raises(ValueError, match="other singular vectors"):
        adapters.add(tree, "d", svft_jax.apply(other, "plain", svd_backend="numpy"))
    with pytest.raises(ValueError, match="other base settings"):
        adapters.add(tree, "d", svft_jax.apply(params, "plain", rank=4, svd_backend="numpy"))
    with pytest.raises(ValueError, match="no adapter named"):
        adapters.select(tree, "nope")
    with pytest.raises(TypeError, match="SVFT"):
        adapters.create(svft_jax.baselines.lora.apply(params, rank=2))
    with pytest.raises(TypeError, match="adapters.save"):
        svft_jax.checkpoint.save_adapter("unused.safetensors", tree)
    assert "svft-set(K=3" in svft_jax.summary(tree, print_fn=None)  # the generic summary reads set nodes too
    smaller = adapters.remove(tree, "b")
    assert adapters.names(smaller) == ("a", "c")
    assert _kernels(smaller)["Dense_0/kernel"].bank.shape[0] == 2
