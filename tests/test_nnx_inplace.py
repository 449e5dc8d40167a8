"""SVFT (and LoRA/DoRA/VeRA) in place on Flax NNX models: `svft_jax.nnx.adapt`.

Truths:
  * layouts: each adapted weight's W is the linear map its own module computes — U Σ Vᵀ equals
    the module's Jacobian (float64) — and the expected (stack, in, out) axes are written here
    by hand per module; nobody declared them;
  * at M = 0 the adapted model's output equals the base model's (float32 rounding);
  * outputs equal the base model run on dense kernels merged in numpy float64 from U, s, V and
    M (Ω scattered by hand, `tests/reference.py`); gradients of M equal (Uᵀ G_W V) on Ω with
    G_W the dense model's own kernel gradient (float64); LoRA/DoRA/VeRA's gradients equal
    jax.grad through `svft_jax.merge` of the same nodes (the pytree path);
  * training with `nnx.Optimizer(wrt=nnx.LoRAParam)` changes only the adapters' trainable
    arrays: base weights and frozen factors are bit-identical after the steps;
  * `merge` in place gives the adapted model's function with no adapter variable left;
  * an adapter file written from the NNX path loads onto the base parameter pytree (and the
    reverse) with the same update, mapped by path;
  * `size` reports, with no SVD and the model's state bit-identical after it, the per-target and
    total counts that `count_parameters` measures on the model `adapt` builds;
  * a factor store filled by one `adapt` makes the next one run no SVD and give bit-identical
    U, s, V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import svft_jax
import svft_jax.nnx as snnx
from tests import reference

IN, QKV, HEADS, OUT = 16, 32, 4, 3
HEAD_DIM = QKV // HEADS
LAYERS = 3


class Net(nnx.Module):
    """MultiHeadAttention (qkv 32 ≠ in 16), a LinearGeneral and an Einsum with 3-D kernels, an
    MLP Linear and a head; BatchNorm for mutable state."""

    def __init__(self, rngs: nnx.Rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=IN, qkv_features=QKV, decode=False, rngs=rngs)
        self.proj = nnx.LinearGeneral(IN, (HEADS, HEAD_DIM), rngs=rngs)  # kernel (16, 4, 8)
        self.mix = nnx.Einsum("btnh,nhd->btd", (HEADS, HEAD_DIM, IN), (IN,), rngs=rngs)  # kernel (4, 8, 16)
        self.bn = nnx.BatchNorm(IN, rngs=rngs)
        self.mlp = nnx.Linear(IN, 2 * IN, rngs=rngs)
        self.head = nnx.Linear(2 * IN, OUT, rngs=rngs)

    def __call__(self, x):
        h = x + self.attn(x)
        h = self.bn(h + self.mix(self.proj(h)))
        return self.head(jax.nn.gelu(self.mlp(h)))


# weight -> (stack, in, out), written from each module's definition
EXPECTED_LAYOUTS = {
    "attn/query/kernel": (0, (0,), (1, 2)), "attn/key/kernel": (0, (0,), (1, 2)),
    "attn/value/kernel": (0, (0,), (1, 2)), "attn/out/kernel": (0, (0, 1), (2,)),
    "proj/kernel": (0, (0,), (1, 2)), "mix/kernel": (0, (0, 1), (2,)), "mlp/kernel": (0, (0,), (1,)),
}


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(IN, IN, rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.lin(x))


class Scanned(nnx.Module):
    """LAYERS blocks made by `nnx.vmap` (kernel (3, 16, 16)) and run by `nnx.scan`."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def step(block, x):
            return block(x)

        return step(self.blocks, x)


def _x(shape=(2, 5, IN), seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _randomise(model, scale=0.3, seed=0):
    """Every adapter's trainable arrays set to random values (M ≠ 0)."""
    state = nnx.state(model, snnx.AdapterParam)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), state)
    nnx.update(model, state)


def _assert_grad_close(got, want, message=""):
    """float32 gradients against their reference: 1e-4 relative to the largest entry."""
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(np.abs(want).max(), 1e-3), err_msg=message)


def _by_path(state) -> dict:
    """{'/'-joined path: array} of an nnx State (e.g. the gradients nnx.grad returns)."""
    return {"/".join(map(str, path)): np.asarray(variable[...]) for path, variable in nnx.to_flat_state(state)}


def _nodes(model):
    tree = snnx.to_tree(model)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=svft_jax.is_node)[0] if svft_jax.is_node(x)}


# ---------------------------------------------------------------------------- targets and layouts
def test_every_projection_is_adapted_with_the_layout_of_its_matmul():
    base = Net(nnx.Rngs(0))
    model = snnx.adapt(base, snnx.SVFT(), _x())
    report = snnx.report(model)
    found = {t.path: (t.layout.stack_ndim, t.layout.in_axes, t.layout.out_axes) for t in report.targets}
    assert found == EXPECTED_LAYOUTS
    left = {x.path: x for x in report.left_out}
    assert left["head/kernel"].matmul and "'head'" in left["head/kernel"].reason
    assert "reshape" in left["proj/bias"].reason  # a 2-D bias is seen, and why it is not a matmul weight
    text = snnx.summary(model)
    assert "adapted weights: 7" in text and "head/kernel" in text
    assert not snnx.is_adapted(base) and type(base) is Net  # adapt returns a clone


def test_each_w_is_the_linear_map_its_module_computes():
    base = Net(nnx.Rngs(0))
    nodes = _nodes(snnx.adapt(base, snnx.SVFT(), _x()))

    def jacobian(fn, in_shape):
        zero = jnp.zeros(in_shape, jnp.float32)
        jac = np.asarray(jax.jacobian(lambda v: fn(v) - fn(zero))(zero), np.float64)
        return jac.reshape(-1, int(np.prod(in_shape)))

    maps = {"proj/kernel": (lambda v: base.proj(v), (IN,)),
            "mix/kernel": (lambda v: base.mix(v[None, None])[0, 0], (HEADS, HEAD_DIM)),
            "attn/out/kernel": (lambda v: base.attn.out(v), (HEADS, HEAD_DIM)),
            "mlp/kernel": (lambda v: base.mlp(v), (IN,))}
    for path, (fn, in_shape) in maps.items():
        node = nodes[path]
        usv = reference.f64(node.u) * reference.f64(node.s)[None] @ reference.f64(node.v).T
        np.testing.assert_allclose(usv, jacobian(fn, in_shape), atol=1e-5, err_msg=path)


def test_rules_first_match_wins_and_pick_methods_and_strategies():
    rules = [snnx.Rule(path=r"attn/(query|key)/kernel", method=snnx.LoRA(rank=2), strategy="factored"),
             snnx.Rule(path=r"attn/.*", method=None),
             snnx.Rule(path=r"head/kernel", method=snnx.SVFT(pattern=snnx.Plain()), strategy="rebuild"),
             snnx.Rule(method=snnx.SVFT(pattern=snnx.Banded(d=1)))]
    model = snnx.adapt(Net(nnx.Rngs(0)), rules, _x())
    report = snnx.report(model)
    by_path = {t.path: t for t in report.targets}
    assert {p: t.rule for p, t in by_path.items()} == {
        "attn/query/kernel": 0, "attn/key/kernel": 0, "head/kernel": 2, "proj/kernel": 3, "mix/kernel": 3, "mlp/kernel": 3}
    assert by_path["attn/key/kernel"].method.startswith("lora") and by_path["mlp/kernel"].method == "svft-banded(d=1)"
    left = {x.path: x.reason for x in report.left_out}
    assert "rule 1" in left["attn/value/kernel"] and "rule 1" in left["attn/out/kernel"]
    model(_x())
    plan = type(model)._svft_last_plan
    assert plan["attn/query/kernel"] == ("factored",) and plan["head/kernel"] == ("rebuild",)


@pytest.mark.parametrize("rule, message", [
    (snnx.Rule(path=r"nothing/.*", method=snnx.SVFT()), "matches no weight of the model"),
    (snnx.Rule(path=r"proj/bias", method=snnx.SVFT()), r"not matmul weights.*proj/bias.*reshape"),
])
def test_a_rule_that_matches_nothing_raises(rule, message):
    with pytest.raises(ValueError, match=rf"(?s)rule 0 .*{message}"):
        snnx.adapt(Net(nnx.Rngs(0)), [rule, snnx.Rule(method=snnx.SVFT())], _x())


def test_a_rule_shadowed_by_an_earlier_one_raises():
    rules = [snnx.Rule(path=r"mlp/kernel", method=snnx.SVFT()), snnx.Rule(path=r"mlp/.*", method=snnx.LoRA())]
    with pytest.raises(ValueError, match=r"rule 1 .*taken by an earlier rule.*'mlp/kernel'"):
        snnx.adapt(Net(nnx.Rngs(0)), rules, _x())


class Twice(nnx.Module):
    """One weight used in two different contractions: x W and y Wᵀ."""

    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (IN, 8)))

    def __call__(self, x, y):
        return jnp.sum(x @ self.w) + jnp.sum(y @ self.w.T)


def test_a_weight_in_two_contractions_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"(?s)'w' \(16, 8\).*in \(0,\), out \(1,\).*in \(1,\), out \(0,\).*method=None"):
        snnx.adapt(Twice(nnx.Rngs(0)), snnx.SVFT(), _x((2, IN)), _x((2, 8)))


def test_rules_that_leave_everything_out_raise():
    with pytest.raises(ValueError, match="adapt no weight"):
        snnx.adapt(Net(nnx.Rngs(0)), [snnx.Rule(path=".*", method=None)], _x())


def test_a_rule_layout_is_checked_against_the_op():
    bad = snnx.Rule(path="mlp/kernel", method=snnx.SVFT(), layout={"stack_ndim": 0, "in_axes": (1,), "out_axes": (0,)})
    with pytest.raises(ValueError, match=r"'mlp/kernel'.*rule 0 expects layout.*in_axes': \(0,\)"):
        snnx.adapt(Net(nnx.Rngs(0)), [bad], _x())
    good = snnx.Rule(path="mlp/kernel", method=snnx.SVFT(), layout={"stack_ndim": 0, "in_axes": (0,), "out_axes": (1,)})
    assert [t.path for t in snnx.report(snnx.adapt(Net(nnx.Rngs(0)), [good], _x())).targets] == ["mlp/kernel"]


def test_rules_are_frozen_typed_and_validated():
    rule = snnx.Rule(path="a", method=snnx.SVFT(pattern=snnx.Banded(d=2)))
    with pytest.raises(dataclasses_frozen_error()):
        rule.path = "b"
    assert hash(rule) == hash(snnx.Rule(path="a", method=snnx.SVFT(pattern=snnx.Banded(d=2))))
    with pytest.raises(TypeError):
        snnx.Rule("a", snnx.SVFT())  # kw_only
    with pytest.raises(ValueError, match="not a valid regular expression"):
        snnx.Rule(path="(", method=snnx.SVFT())
    with pytest.raises(ValueError, match="(?s)strategy.*fastest"):  # checked by adapt, before any trace
        snnx.adapt(Net(nnx.Rngs(0)), [snnx.Rule(method=snnx.SVFT(), strategy="fastest")], _x())
    with pytest.raises(TypeError, match="pattern spec"):
        snnx.SVFT(pattern=3)
    with pytest.raises(TypeError, match="method config"):
        snnx.adapt(Net(nnx.Rngs(0)), "svft", _x())


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


# ---------------------------------------------------------------------------- values and gradients
def _loss(model, x, g):
    return jnp.sum(model(x) * g)


@pytest.mark.parametrize("pattern", [snnx.Plain(), snnx.Banded(d=2), snnx.Random(k=40), snnx.TopK(k=40)],
                         ids=lambda p: p.name)
def test_outputs_and_gradients_equal_the_float64_merged_model(pattern):
    base = Net(nnx.Rngs(0))
    x = _x()
    model = snnx.adapt(base, snnx.SVFT(pattern=pattern), x)
    np.testing.assert_allclose(model(x), base(x), rtol=1e-5, atol=1e-5)  # M = 0: the base model
    _randomise(model)
    nodes = _nodes(model)
    merged = {path: reference.kernel(node) for path, node in nodes.items()}
    dense = reference.dense_nnx_model(base, merged)
    np.testing.assert_allclose(model(x), dense(x), rtol=2e-5, atol=2e-5)

    g = _x((2, 5, OUT), seed=2)
    grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, g)
    dense_grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.Param))(dense, x, g)
    grads, dense_grads = _by_path(grads), _by_path(dense_grads)
    assert len(grads) == len(nodes)  # only M has a gradient
    for path, node in nodes.items():
        expected = reference.omega_gradient(node, dense_grads[path])
        _assert_grad_close(grads[f"{path}_svft_m"], expected, path)


@pytest.mark.parametrize("method", [snnx.LoRA(rank=3), snnx.DoRA(rank=2), snnx.VeRA(rank=6)], ids=lambda m: m.name)
def test_baselines_run_at_the_op_equal_to_their_merged_model(method):
    base = Net(nnx.Rngs(0))
    x, g = _x(), _x((2, 5, OUT), seed=2)
    model = snnx.adapt(base, method, x)
    np.testing.assert_allclose(model(x), base(x), rtol=1e-5, atol=1e-5)
    _randomise(model, scale=0.1)
    tree = snnx.to_tree(model)
    graphdef, _, rest = nnx.split(base, nnx.Param, ...)

    def merged_loss(tree):
        return _loss(nnx.merge(graphdef, svft_jax.merge(tree), rest, copy=True), x, g)

    np.testing.assert_allclose(model(x), nnx.merge(graphdef, svft_jax.merge(tree), rest, copy=True)(x), rtol=2e-5, atol=2e-5)
    grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, g)
    expected = {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in
                jax.tree_util.tree_flatten_with_path(jax.grad(merged_loss)(tree), is_leaf=svft_jax.is_node)[0]}
    grads = _by_path(grads)
    for path in _nodes(model):
        node_grad = expected[path]
        for field in type(node_grad).trainable_fields():
            _assert_grad_close(grads[f"{path}_{method.name}_{field}"], getattr(node_grad, field), f"{path}/{field}")


# ---------------------------------------------------------------------------- training
def test_optimizer_on_lora_params_trains_only_the_adapters():
    base = Net(nnx.Rngs(0))
    x, g = _x(), _x((2, 5, OUT), seed=2)
    model = snnx.adapt(base, snnx.SVFT(pattern=snnx.Banded(d=1)), x)
    not_trained = nnx.All(nnx.Not(nnx.LoRAParam), nnx.Not(nnx.BatchStat))  # base weights, U, s, V
    frozen_before = jax.tree.map(np.array, nnx.state(model, not_trained))
    trained_before = jax.tree.map(np.array, nnx.state(model, nnx.LoRAParam))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - g) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    frozen_after = jax.tree_util.tree_flatten_with_path(nnx.state(model, not_trained))[0]
    assert len(frozen_after) == len(jax.tree.leaves(frozen_before)) > 7 * 3
    for (path, after), was in zip(frozen_after, jax.tree.leaves(frozen_before), strict=True):
        np.testing.assert_array_equal(np.asarray(after), was, err_msg=jax.tree_util.keystr(path))
    changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), nnx.state(model, nnx.LoRAParam), trained_before)
    assert all(jax.tree.leaves(changed))
    # BatchNorm statistics moved as the base model's would (train mode): mutable state is written back
    assert not np.array_equal(np.asarray(model.bn.mean[...]), np.asarray(base.bn.mean[...]))


def test_trainable_arrays_are_plain_lora_params_that_adapter_param_tells_from_other_lora_params():
    """Tunix's sampler takes a LoRA-only sync only of the exact type `nnx.LoRAParam`: the
    trainable arrays are of that type, and `snnx.AdapterParam` (a test on their metadata)
    selects them and not a LoRAParam of the user's own."""
    x = _x()
    model = snnx.adapt(Net(nnx.Rngs(0)), [snnx.Rule(path="mlp/kernel", method=snnx.LoRA(rank=2)),
                                          snnx.Rule(method=snnx.SVFT(pattern=snnx.Banded(d=1)))], x)
    model.mlp.own = nnx.LoRAParam(jnp.zeros(3))  # a LoRAParam that is not an adapter's
    def paths(state):
        leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
        return {"/".join(str(getattr(k, "key", k)) for k in path): type(v) for path, v in leaves}

    lora, ours = paths(nnx.state(model, nnx.LoRAParam)), paths(nnx.state(model, snnx.AdapterParam))
    assert set(lora.values()) == {nnx.LoRAParam}
    assert set(lora) - set(ours) == {"mlp/own"}
    assert {p.rsplit("_", 1)[-1] for p in ours} == {"m", "a", "b"} and len(ours) == len(snnx.report(model).targets) + 1
    assert isinstance(model.mlp.kernel_lora_a, snnx.AdapterParam) and not isinstance(model.mlp.own, snnx.AdapterParam)
    assert not isinstance(model.mlp.kernel, snnx.AdapterParam)


def test_scanned_stack_is_read_per_layer_and_equals_its_merged_model():
    base = Scanned(nnx.Rngs(0))
    x, g = _x(), _x(seed=2)
    model = snnx.adapt(base, snnx.SVFT(pattern=snnx.Banded(d=1)), x)
    (target,) = snnx.report(model).targets
    assert target.path == "blocks/lin/kernel" and target.layout.stack_ndim == 1
    assert (target.layout.in_axes, target.layout.out_axes) == ((1,), (2,))
    np.testing.assert_allclose(model(x), base(x), rtol=1e-5, atol=1e-5)
    _randomise(model)
    (node,) = _nodes(model).values()
    dense = reference.dense_nnx_model(base, {"blocks/lin/kernel": reference.kernel(node)})
    np.testing.assert_allclose(model(x), dense(x), rtol=2e-5, atol=2e-5)
    grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, g)
    dense_grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.Param))(dense, x, g)
    expected = reference.omega_gradient(node, _by_path(dense_grads)["blocks/lin/kernel"])
    _assert_grad_close(_by_path(grads)["blocks/lin/kernel_svft_m"], expected)


# ---------------------------------------------------------------------------- size, factor store
def _refuse_svd(monkeypatch):
    from svft_jax.methods.svft import _factorize

    def refuse(*args, **kwargs):
        raise AssertionError("an SVD ran")

    monkeypatch.setattr(_factorize, "svd_factors", refuse)


def test_size_counts_what_adapt_builds_with_no_svd_and_the_model_unchanged(monkeypatch):
    base = Net(nnx.Rngs(0))
    x = _x()
    rules = [snnx.Rule(path=r"attn/(query|key)/kernel", method=snnx.LoRA(rank=2)),
             snnx.Rule(path=r"attn/value/kernel", method=snnx.VeRA(rank=4)),
             snnx.Rule(method=snnx.SVFT(pattern=snnx.Banded(d=1), init="reference"))]
    before = _by_path(nnx.state(base))
    with monkeypatch.context() as patch:
        _refuse_svd(patch)
        printed = []
        report = snnx.size(base, rules, x, print_fn=printed.append)
    after = _by_path(nnx.state(base))
    assert after.keys() == before.keys() and type(base) is Net and not snnx.is_adapted(base)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    model = snnx.adapt(base, rules, x)
    targets = {t.path: t for t in snnx.report(model).targets}
    assert {row.path: row.trainable for row in report.rows} == {p: t.trainable for p, t in targets.items()}
    assert {row.path: row.method for row in report.rows} == {p: t.method for p, t in targets.items()}
    counts = svft_jax.count_parameters(snnx.to_tree(model))
    trainable = sum(int(np.prod(v.shape)) for v in _by_path(nnx.state(model, nnx.LoRAParam)).values())
    assert report.totals["trainable"] == counts["trainable"] == trainable
    assert report.totals["total"] == counts["total"] and report.totals["targets"] == counts["targets"] == 7
    assert "attn/value/kernel" in printed[0] and "trainable params:" in printed[0]
    with pytest.raises(ValueError, match="matches no weight"):
        snnx.size(base, snnx.Rule(path="nothing/.*", method=snnx.SVFT()), x)


def test_a_second_adapt_with_the_factor_store_runs_no_svd_and_gives_the_same_factors(monkeypatch):
    base = Net(nnx.Rngs(0))
    x = _x()
    config = snnx.SVFT(pattern=snnx.Banded(d=1))
    store = {}
    first = _nodes(snnx.adapt(base, config, x, factors=store))
    assert len(store) == len(first) == 7
    _refuse_svd(monkeypatch)
    second = _nodes(snnx.adapt(base, config, x, factors=store))
    assert second.keys() == first.keys()
    for path, node in first.items():
        for field in ("u", "s", "v"):
            a, b = np.asarray(getattr(node, field)), np.asarray(getattr(second[path], field))
            assert a.dtype == b.dtype and np.array_equal(a, b), (path, field)
    with pytest.raises(AssertionError, match="an SVD ran"):  # the patch is live: without the store, SVDs run
        snnx.adapt(base, config, x)


# ---------------------------------------------------------------------------- round trips
def test_merge_in_place_gives_the_adapted_function_and_drops_the_adapter():
    base = Net(nnx.Rngs(0))
    x = _x()
    model = snnx.adapt(base, [snnx.Rule(path="mlp/kernel", method=snnx.LoRA(rank=2)),
                              snnx.Rule(method=snnx.SVFT(pattern=snnx.Banded(d=1)))], x)
    _randomise(model, scale=0.1)
    expected = model(x)
    merged = snnx.merge(model)
    assert merged is model and type(model) is Net and not snnx.is_adapted(model)
    assert not jax.tree.leaves(nnx.state(model, snnx.AdapterParam)) and not jax.tree.leaves(nnx.state(model, snnx.AdapterFactor))
    np.testing.assert_allclose(model(x), expected, rtol=2e-5, atol=2e-5)
    assert model.mlp.kernel[...].dtype == base.mlp.kernel[...].dtype


def test_adapter_files_move_between_the_nnx_path_and_the_parameter_pytree(tmp_path):
    base = Net(nnx.Rngs(0))
    x = _x()
    model = snnx.adapt(base, snnx.SVFT(pattern=snnx.Banded(d=1)), x)
    _randomise(model)
    snnx.save_adapter(tmp_path / "nnx.safetensors", model)
    # NNX -> parameter pytree: the same update on every target, by path
    tree = svft_jax.checkpoint.load_adapter(tmp_path / "nnx.safetensors", snnx.params(base))
    graphdef, _, rest = nnx.split(base, nnx.Param, ...)
    pytree_model = nnx.merge(graphdef, svft_jax.merge(tree), rest, copy=True)
    np.testing.assert_allclose(pytree_model(x), model(x), rtol=2e-5, atol=2e-5)
    # ... and back onto a fresh NNX model
    again = snnx.load_adapter(base, tmp_path / "nnx.safetensors", x)
    np.testing.assert_allclose(again(x), model(x), rtol=2e-5, atol=2e-5)
    # parameter pytree -> NNX: an adapter trained on the pytree API
    pytree = svft_jax.apply(snnx.params(base), "plain", targets="mlp/kernel")
    node = pytree["mlp"]["kernel"]
    import dataclasses

    pytree["mlp"]["kernel"] = dataclasses.replace(node, m=jnp.linspace(-0.3, 0.3, node.m.shape[0]))
    svft_jax.checkpoint.save_adapter(tmp_path / "tree.safetensors", pytree)
    installed = snnx.load_adapter(base, tmp_path / "tree.safetensors", x)
    expected = nnx.merge(graphdef, svft_jax.merge(pytree), rest, copy=True)(x)
    np.testing.assert_allclose(installed(x), expected, rtol=2e-5, atol=2e-5)


def test_from_tree_refuses_another_layout_than_the_op():
    base = Net(nnx.Rngs(0))
    wrong = svft_jax.apply(snnx.params(base), "plain", targets="mlp/kernel",
                           overrides={"mlp/kernel": {"layout": "out_in"}})
    with pytest.raises(ValueError, match=r"'mlp/kernel' reads the weight with stack 0, in \(1,\)"):
        snnx.from_tree(base, wrong, _x())


def test_adapter_sharding_follows_the_weight_and_m_is_replicated():
    with nnx.use_eager_sharding(False) if hasattr(nnx, "use_eager_sharding") else _nothing():
        lin = nnx.Linear(IN, 8, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("fsdp", "tp")),
                         rngs=nnx.Rngs(0))
    model = snnx.adapt(lin, snnx.Rule(path="kernel", method=snnx.SVFT(pattern=snnx.Banded(d=1))), _x((2, IN)))
    assert model.kernel_svft_u.get_metadata()["out_sharding"] == ("tp", None)  # U: (d1 = out, r)
    assert model.kernel_svft_v.get_metadata()["out_sharding"] == ("fsdp", None)  # V: (d2 = in, r)
    assert model.kernel_svft_m.get_metadata()["out_sharding"] == (None,)
    assert str(model.kernel_svft_m.get_metadata()["omega"]).startswith("svft-banded(d=1): ")


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_adapter_arrays_are_placed_on_the_weight_mesh():
    devices = np.array(jax.devices()[:8])
    if devices.size < 8:
        pytest.skip("needs 8 (virtual) devices: tests/conftest.py sets them before jax starts")
    mesh = jax.sharding.Mesh(devices.reshape(2, 4), ("fsdp", "tp"))
    P = jax.sharding.PartitionSpec
    lin = nnx.Linear(IN, 8, rngs=nnx.Rngs(0))
    kernel = jax.device_put(lin.kernel[...], jax.sharding.NamedSharding(mesh, P("fsdp", "tp")))
    lin.kernel = nnx.Param(kernel, out_sharding=("fsdp", "tp"), eager_sharding=False)
    model = snnx.adapt(lin, snnx.Rule(path="kernel", method=snnx.SVFT(pattern=snnx.Banded(d=1))), _x((2, IN)))
    assert model.kernel_svft_u[...].sharding.spec == P("tp", None)
    assert model.kernel_svft_v[...].sharding.spec == P("fsdp", None)
    assert model.kernel_svft_m[...].sharding.is_fully_replicated
    np.testing.assert_allclose(model(_x((2, IN))), lin(_x((2, IN))), rtol=1e-5, atol=1e-5)
