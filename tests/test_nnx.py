"""SVFT on Flax NNX, the standard workflow: `nnx.split(model, nnx.Param, ...)` →
`svft_jax.apply(params, overrides=svft_jax.models.nnx_layouts(model))` → a jitted training step
that threads the non-parameter state (dropout RNG counts, BatchNorm statistics) → write back
with `nnx.update`.

Truths: each kernel's layout is the linear map its module computes (the Jacobian of the
module's own call); at M = 0 the merged model's output is bit-identical to the model's; after
training the written-back kernels equal a float64 numpy W0 + U M Vᵀ with Ω scattered by hand
and reshaped by hand per module; BatchNorm's running mean/var after a step equal
momentum·old + (1 − momentum)·(batch statistics of its input, recomputed from the model's
own submodules); the dropout stream's count advances once per step, and a new count gives a
new mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import svft_jax
from svft_jax._paths import path_to_str
from svft_jax.models import nnx_layouts

IN, QKV, HEADS, OUT, BATCH, TOKENS, STEPS = 16, 32, 4, 3, 8, 5, 6
HEAD_DIM = QKV // HEADS
EXTRA = r"head/.*"  # the new task head trains in full


class Net(nnx.Module):
    """Attention whose qkv width (32) differs from its input (16), so (16, 4, 8) query kernels
    cannot be read from the shape; a LinearGeneral and an Einsum with 3-D kernels; BatchNorm
    and dropout for mutable state."""

    def __init__(self, rngs: nnx.Rngs, dropout: float = 0.2):
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=IN, qkv_features=QKV, decode=False, rngs=rngs)
        self.proj = nnx.LinearGeneral(IN, (HEADS, HEAD_DIM), rngs=rngs)  # kernel (16, 4, 8)
        self.mix = nnx.Einsum("btnh,nhd->btd", (HEADS, HEAD_DIM, IN), (IN,), rngs=rngs)  # kernel (4, 8, 16)
        self.bn = nnx.BatchNorm(IN, rngs=rngs)
        self.mlp = nnx.Linear(IN, 2 * IN, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(2 * IN, OUT, rngs=rngs)

    def features(self, x):
        """Everything before BatchNorm: (B, T, IN)."""
        h = x + self.attn(x)
        return h + self.mix(self.proj(h))

    def __call__(self, x):
        h = self.bn(self.features(x))
        return self.head(self.drop(jax.nn.gelu(self.mlp(h)))).mean(axis=1)


def _flat(tree):
    return {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=svft_jax.is_node)[0]}


def _nodes(tree):
    return {p: x for p, x in _flat(tree).items() if svft_jax.is_node(x)}


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, TOKENS, IN)).astype(np.float32)
    return x, rng.standard_normal((BATCH, OUT)).astype(np.float32)


# ----------------------------------------------------------------------------- layouts
def _jacobian(fn, in_shape):
    """The matrix of a linear map (bias removed): (prod(out), prod(in)), float64."""
    zero = jnp.zeros(in_shape, jnp.float32)
    jac = np.asarray(jax.jacobian(lambda v: fn(v) - fn(zero))(zero), np.float64)
    out_size = jac.size // int(np.prod(in_shape))
    return jac.reshape(out_size, -1)


def _stack_factory(rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return nnx.Linear(IN, 8, rngs=rngs)

    return make(rngs)


# name -> (module factory, the module's linear map on one example, its input shape, layers)
MODULES = {
    "mha_query": (lambda r: Net(r).attn, lambda m, v: m(v), (IN,), None),
    "mha_out": (lambda r: Net(r).attn, lambda m, v: m(v), (HEADS, HEAD_DIM), None),
    "linear": (lambda r: nnx.Linear(IN, 8, rngs=r), lambda m, v: m(v), (IN,), None),
    "linear_general": (lambda r: nnx.LinearGeneral((HEADS, HEAD_DIM), (2, IN), axis=(-2, -1), rngs=r), lambda m, v: m(v), (HEADS, HEAD_DIM), None),
    "einsum_heads": (lambda r: Net(r).mix, lambda m, v: m(v[None, None])[0, 0], (HEADS, HEAD_DIM), None),
    "einsum_out_in": (lambda r: nnx.Einsum("bd,ed->be", (8, IN), (8,), rngs=r), lambda m, v: m(v[None])[0], (IN,), None),
    "conv_1d": (lambda r: nnx.Conv(IN, 8, (3,), padding="VALID", rngs=r), lambda m, v: m(v[None])[0], (3, IN), None),
    "vmap_stack": (_stack_factory, None, (IN,), 3),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_nnx_layouts_read_each_kernel_as_the_map_its_module_computes(name):
    factory, call, in_shape, layers = MODULES[name]
    module = factory(nnx.Rngs(0))
    submodule = {"mha_query": lambda m: m.query, "mha_out": lambda m: m.out}.get(name, lambda m: m)(module)
    kernel_path = {"mha_query": "query/kernel", "mha_out": "out/kernel"}.get(name, "kernel")
    overrides = nnx_layouts(module, targets=kernel_path + "/value")
    _, state = nnx.split(module)
    adapted = svft_jax.apply(state, targets=kernel_path + "/value", overrides=overrides, svd_backend="numpy")
    node = _nodes(adapted)[kernel_path + "/value"]
    product = np.asarray(node.u, np.float64) * np.asarray(node.s, np.float64)[..., None, :] @ np.swapaxes(np.asarray(node.v, np.float64), -1, -2)
    kernel = np.asarray(submodule.kernel[...])
    if layers is None:
        expected = _jacobian(lambda v: call(submodule, v), in_shape)
    else:  # one matrix per stacked layer: the layer's own Linear on its slice of the kernel
        expected = np.stack([_jacobian(lambda v, k=kernel[i]: v @ k, in_shape) for i in range(layers)])
    assert product.shape == expected.shape
    np.testing.assert_allclose(product, expected, atol=1e-5)


def test_attention_kernels_need_no_declared_layout_and_match_nnx_layouts():
    model = Net(nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    targets = r"attn/.*/kernel/value|mlp/kernel/value"
    by_path = _nodes(svft_jax.apply(params, targets=targets, svd_backend="numpy"))
    declared = _nodes(svft_jax.apply(params, targets=targets, overrides=nnx_layouts(model, targets=targets), svd_backend="numpy"))
    assert set(by_path) == set(declared) and len(by_path) == 5
    for path, node in by_path.items():
        assert node.meta.layout == declared[path].meta.layout, path
    query = by_path["attn/query/kernel/value"]
    assert (query.meta.layout.d1, query.meta.layout.d2) == (QKV, IN)  # not 16 stacked 4×8 matrices


def test_linear_general_and_einsum_kernels_are_refused_without_their_module():
    model = Net(nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    with pytest.raises(ValueError, match=r"(?s)'proj/kernel/value'.*\(16, 4, 8\).*nnx_layouts"):
        svft_jax.apply(params, targets="proj/kernel/value", svd_backend="numpy")
    with pytest.raises(ValueError, match=r"(?s)'mix/kernel/value'.*\(4, 8, 16\)"):
        svft_jax.apply(params, targets="mix/kernel/value", svd_backend="numpy")


def test_a_vmap_stack_is_refused_by_path_and_read_per_layer_by_nnx_layouts():
    stack = _stack_factory(nnx.Rngs(0))
    _, state = nnx.split(stack)
    with pytest.raises(ValueError, match=r"(?s)'kernel/value'.*\(3, 16, 8\).*'stacked_in_out'"):
        svft_jax.apply(state, svd_backend="numpy")
    assert nnx_layouts(stack)[r"kernel(?:/value)?"]["layout"] == {"stack_ndim": 1, "in_axes": (1,), "out_axes": (2,)}


def test_nnx_layouts_regexes_match_state_and_pure_dict_paths_and_carry_options():
    model = Net(nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    overrides = nnx_layouts(model, pattern="banded", d=1)
    assert all(v["pattern"] == "banded" and v["d"] == 1 for v in overrides.values())
    for tree in (params, nnx.to_pure_dict(params)):
        nodes = _nodes(svft_jax.apply(tree, overrides=overrides, svd_backend="numpy"))
        assert len(nodes) == 7 and all(n.meta.pattern == "banded" for n in nodes.values())
    with pytest.raises(TypeError, match="nnx.Module"):
        nnx_layouts(nnx.to_pure_dict(params))


def test_nnx_layouts_enter_only_the_kernels_apply_adapts():
    """apply refuses an override that matches no target, so nnx_layouts follows the targets."""
    model = Net(nnx.Rngs(0))
    default = {key.split("(")[0] for key in nnx_layouts(model)}
    assert "head/kernel" not in default and "attn/query/kernel" in default and len(default) == 7
    chosen = nnx_layouts(model, targets=r"(head|proj)/kernel/value")
    assert {key.split("(")[0] for key in chosen} == {"head/kernel", "proj/kernel"}
    conv = nnx.Conv(IN, 8, (3,), rngs=nnx.Rngs(0))
    assert nnx_layouts(conv) == {}  # convolutions are not default targets...
    assert list(nnx_layouts(conv, targets="kernel/value")) == [r"kernel(?:/value)?"]  # ...unless named


# ----------------------------------------------------------------------------- the workflow
@functools.cache
def _workflow():
    x, y = _data()
    model = Net(nnx.Rngs(0, dropout=1))
    model.train()  # BatchNorm uses batch statistics, dropout is on
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    adapted = svft_jax.apply(params, "banded", d=1, overrides=nnx_layouts(model), extra=EXTRA, svd_backend="numpy")
    trainable, frozen = svft_jax.split(adapted)  # M and the head (declared once, by `extra`)
    tx = svft_jax.optimizer(optax.adam(1e-2))

    def loss_fn(trainable, rest):
        # copy=True: `rest`'s Variables belong to jit's trace; BatchNorm may only mutate
        # Variables of the current (grad) trace, so merge fresh copies.
        model = nnx.merge(graphdef, svft_jax.merge(svft_jax.combine(trainable, frozen)), rest, copy=True)
        loss = jnp.mean((model(x) - y) ** 2)
        return loss, nnx.split(model, nnx.Param, ...)[2]  # BatchNorm stats, dropout count: advanced

    @jax.jit
    def step(trainable, opt_state, rest):
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, rest)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, rest, loss

    states, opt_state = [(trainable, rest)], tx.init(trainable)
    for _ in range(STEPS):
        trainable, opt_state, rest, _ = step(trainable, opt_state, rest)
        states.append((trainable, rest))
    return dict(x=x, y=y, model=model, graphdef=graphdef, params=params, adapted=adapted,
                frozen=frozen, states=states, loss=jax.jit(loss_fn))


def _eval_output(graphdef_source, param_tree, rest, x):
    """The model in eval mode (running BatchNorm statistics, no dropout) on `param_tree`."""
    model = nnx.merge(graphdef_source, param_tree, rest)
    model.eval()
    return np.asarray(model(x))


def test_zero_m_reproduces_the_models_own_output_exactly():
    run = _workflow()
    graphdef, (_, rest0) = run["graphdef"], run["states"][0]
    merged = jax.jit(svft_jax.merge)(run["adapted"])
    for path, leaf in _flat(run["params"]).items():
        assert np.array_equal(_flat(merged)[path], leaf), path
    reference = _eval_output(graphdef, run["params"], rest0, run["x"])
    np.testing.assert_array_equal(_eval_output(graphdef, merged, rest0, run["x"]), reference)
    # and the untouched model object itself
    model = run["model"]
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(run["x"])), reference)
    model.train()


def test_training_lowers_the_eval_loss_and_leaves_frozen_leaves_bit_identical():
    run = _workflow()
    graphdef, frozen, (first, _), (last, rest) = run["graphdef"], run["frozen"], run["states"][0], run["states"][-1]

    def eval_loss(trainable, rest):
        merged = svft_jax.merge(svft_jax.combine(trainable, frozen))
        return float(np.mean((_eval_output(graphdef, merged, rest, run["x"]) - run["y"]) ** 2))

    assert eval_loss(last, rest) < eval_loss(first, rest) - 1e-3
    final = svft_jax.combine(last, frozen)
    for path, node in _nodes(run["adapted"]).items():
        for field in ("u", "s", "v", "base"):
            assert np.array_equal(getattr(_nodes(final)[path], field), getattr(node, field)), (path, field)
        assert np.any(np.asarray(_nodes(final)[path].m) != 0), path
    head = _flat(svft_jax.merge(final))["head/kernel/value"]
    assert not np.array_equal(head, _flat(run["params"])["head/kernel/value"])  # the extra trained


def test_the_dropout_stream_advances_once_per_step_and_changes_the_mask():
    run = _workflow()
    counts = [int(_flat(rest)["drop/rngs/count/value"]) for _, rest in run["states"]]
    assert counts == list(range(counts[0], counts[0] + STEPS + 1))
    trainable, rest0 = run["states"][0]
    _, rest1 = run["states"][1]
    same = [float(run["loss"](trainable, rest0)[0]) for _ in range(2)]
    assert same[0] == same[1]  # the same state: the same mask
    assert float(run["loss"](trainable, rest1)[0]) != same[0]  # the next count: another mask


def test_batch_norm_statistics_follow_the_batch_of_each_step():
    run = _workflow()
    x, graphdef, frozen = run["x"], run["graphdef"], run["frozen"]
    for (trainable, before), (_, after) in zip(run["states"][:2], run["states"][1:3], strict=True):
        model = nnx.merge(graphdef, svft_jax.merge(svft_jax.combine(trainable, frozen)), before)
        features = np.asarray(model.features(x), np.float64).reshape(-1, IN)  # BatchNorm's input
        old, new = _flat(before), _flat(after)
        momentum = model.bn.momentum
        expected_mean = momentum * old["bn/mean/value"] + (1 - momentum) * features.mean(axis=0)
        expected_var = momentum * old["bn/var/value"] + (1 - momentum) * features.var(axis=0)
        np.testing.assert_allclose(new["bn/mean/value"], expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new["bn/var/value"], expected_var, rtol=1e-4, atol=1e-6)
    assert not np.array_equal(_flat(run["states"][-1][1])["bn/mean/value"], 0)


# W (out × in) -> kernel, by hand per module (independent of svft_jax's layout code)
TO_KERNEL = {
    "attn/query": lambda w: w.T.reshape(IN, HEADS, HEAD_DIM),
    "attn/key": lambda w: w.T.reshape(IN, HEADS, HEAD_DIM),
    "attn/value": lambda w: w.T.reshape(IN, HEADS, HEAD_DIM),
    "attn/out": lambda w: w.T.reshape(HEADS, HEAD_DIM, IN),
    "proj": lambda w: w.T.reshape(IN, HEADS, HEAD_DIM),
    "mix": lambda w: w.T.reshape(HEADS, HEAD_DIM, IN),
    "mlp": lambda w: w.T,
}
TO_MATRIX = {  # kernel -> W (out × in)
    "attn/query": lambda k: k.reshape(IN, QKV).T,
    "attn/key": lambda k: k.reshape(IN, QKV).T,
    "attn/value": lambda k: k.reshape(IN, QKV).T,
    "attn/out": lambda k: k.reshape(QKV, IN).T,
    "proj": lambda k: k.reshape(IN, QKV).T,
    "mix": lambda k: k.reshape(QKV, IN).T,
    "mlp": lambda k: k.T,
}


def test_written_back_model_equals_a_float64_reference_of_w0_plus_u_m_vt():
    run = _workflow()
    trainable, rest = run["states"][-1]
    final = svft_jax.combine(trainable, run["frozen"])
    model = Net(nnx.Rngs(0, dropout=1))
    nnx.update(model, svft_jax.merge(final), rest)  # write back: the model object now holds W
    written = _flat(nnx.state(model, nnx.Param))
    reference = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # nested; the kernels replaced below
    nodes = _nodes(final)
    assert {p.rsplit("/kernel", 1)[0] for p in nodes} == set(TO_KERNEL)
    for path, node in nodes.items():
        module = path.rsplit("/kernel", 1)[0]
        m = np.zeros((node.meta.rank, node.meta.rank))
        np.add.at(m, (node.meta.rows.array, node.meta.cols.array), np.asarray(node.m, np.float64))
        w0 = TO_MATRIX[module](np.asarray(node.base, np.float64))
        w = w0 + np.asarray(node.u, np.float64) @ m @ np.asarray(node.v, np.float64).T
        np.testing.assert_allclose(np.asarray(written[path], np.float64), TO_KERNEL[module](w), rtol=1e-5, atol=1e-6)
        *scopes, leaf = path.removesuffix("/value").split("/")
        functools.reduce(lambda tree, key: tree[key], scopes, reference)[leaf] = TO_KERNEL[module](w).astype(np.float32)
    model.eval()
    expected = _eval_output(run["graphdef"], reference, rest, run["x"])
    np.testing.assert_allclose(np.asarray(model(run["x"])), expected, rtol=1e-5, atol=1e-5)
