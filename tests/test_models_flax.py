"""SVFT on plain Flax models: linen (Dense MLP, multi-head attention with 3-D DenseGeneral
kernels, an nn.scan layer stack with 4-D kernels) and NNX (the `nnx.split` State itself, and
its pure dict). For each: M = 0 reproduces the outputs exactly, a few optimiser steps lower
the loss, and every frozen leaf stays bit-identical.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import svft_jax
import svft_jax.models as svft_models
from svft_jax._paths import path_to_str

BATCH, TOKENS, HIDDEN, HEADS, STEPS, LR = 4, 5, 16, 2, 5, 1e-2
# One compile per tree structure; eager merge would compile every small op per shape.
merge = jax.jit(svft_jax.merge)


# ----------------------------------------------------------------------------- models
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(24)(x))
        x = nn.relu(nn.Dense(HIDDEN)(x))
        return nn.Dense(3)(x)


class Attention(nn.Module):
    """Self-attention whose q/k/v/out kernels are 3-D; `in_features` may differ from qkv."""

    qkv_features: int = HIDDEN

    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=self.qkv_features)(x)
        return nn.Dense(3, name="head")(h).mean(axis=1)


class Block(nn.Module):
    """Attention + MLP with residuals; scanned, so every kernel gets a leading layer axis."""

    @nn.compact
    def __call__(self, x, _):
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(x)
        up = nn.Dense(2 * HIDDEN, name="up")(x)  # scanned kernel (2, 16, 32): an ambiguous shape
        x = x + nn.Dense(HIDDEN, name="down")(nn.relu(up))
        return x, None


class Scanned(nn.Module):
    layers: int = 2

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
        x, _ = stack(name="blocks")(x, None)
        return x.mean(axis=1)


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=HIDDEN, qkv_features=HIDDEN, decode=False, rngs=rngs)
        self.mlp = nnx.Linear(HIDDEN, 24, rngs=rngs)
        self.out = nnx.Linear(24, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.gelu(self.mlp(self.attn(x)))).mean(axis=1)


# ----------------------------------------------------------------------------- harness
def _linen_case(module, x_shape, adapt_kwargs=None):
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    params = jax.jit(module.init)(jax.random.key(0), x)["params"]
    forward = jax.jit(lambda p, x: module.apply({"params": p}, x))
    return params, forward, x, dict(adapt_kwargs or {})


def _nnx_case(pure: bool):
    model = NNXNet(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state) if pure else state
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))  # nnx.merge takes a State or a pure dict
    x = np.random.default_rng(0).standard_normal((BATCH, TOKENS, HIDDEN)).astype(np.float32)
    return params, forward, x, {}


@functools.cache
def _case(name):
    return CASES[name]()


CASES = {
    "linen_mlp": lambda: _linen_case(MLP(), (BATCH, 12)),
    "linen_attention": lambda: _linen_case(Attention(), (BATCH, TOKENS, HIDDEN), dict(extra=r"head/.*")),
    "linen_scan": lambda: _linen_case(
        Scanned(), (BATCH, TOKENS, HIDDEN),
        dict(overrides={**svft_models.attention_layouts(stack_ndim=1), **svft_models.stacked_layouts()})),
    "nnx_state": lambda: _nnx_case(pure=False),
    "nnx_pure_dict": lambda: _nnx_case(pure=True),
}


def _train(forward, adapted, x, y, extra):
    trainable, frozen = svft_jax.split(adapted, extra=extra)
    tx = svft_jax.optimizer(optax.adam(LR), extra=extra)
    opt_state = tx.init(trainable)

    def loss_fn(train):
        prediction = forward(svft_jax.merge(svft_jax.combine(train, frozen)), x)
        return jnp.mean((prediction - y) ** 2)

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(STEPS):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    losses.append(float(jax.jit(loss_fn)(trainable)))
    return losses, svft_jax.combine(trainable, frozen)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    params, forward, x, kwargs = _case(request.param)
    kwargs = dict(kwargs)
    extra = kwargs.pop("extra", None)
    adapted = svft_jax.apply(params, pattern="banded", d=1, svd_backend="numpy", **kwargs)
    reference = np.asarray(forward(params, x))
    y = np.random.default_rng(1).standard_normal(reference.shape).astype(np.float32)
    losses, final = _train(forward, adapted, x, y, extra)
    return dict(name=request.param, params=params, forward=forward, x=x, adapted=adapted,
                reference=reference, extra=extra, losses=losses, final=final)


def _flat(tree):
    return {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=svft_jax.is_node)[0]}


def _nodes(tree):
    return {p: x for p, x in _flat(tree).items() if svft_jax.is_node(x)}


# ----------------------------------------------------------------------------- properties
def test_default_targets_adapt_every_hidden_kernel(case):
    expected = {
        "linen_mlp": {"Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"},
        "linen_attention": {f"MultiHeadDotProductAttention_0/{n}/kernel" for n in ("query", "key", "value", "out")},
        "linen_scan": {f"blocks/MultiHeadDotProductAttention_0/{n}/kernel" for n in ("query", "key", "value", "out")}
        | {"blocks/up/kernel", "blocks/down/kernel"},
        "nnx_state": {f"attn/{n}/kernel/value" for n in ("query", "key", "value", "out")}
        | {"mlp/kernel/value", "out/kernel/value"},
        "nnx_pure_dict": {f"attn/{n}/kernel" for n in ("query", "key", "value", "out")} | {"mlp/kernel", "out/kernel"},
    }[case["name"]]
    assert set(_nodes(case["adapted"])) == expected


def test_merge_at_zero_reproduces_outputs_exactly(case):
    merged = merge(case["adapted"])
    for path, leaf in _flat(case["params"]).items():
        assert np.array_equal(_flat(merged)[path], leaf), path
    assert np.array_equal(np.asarray(case["forward"](merged, case["x"])), case["reference"])


def test_training_lowers_the_loss(case):
    assert case["losses"][-1] < case["losses"][0] - 1e-4, case["losses"]


def test_training_leaves_every_frozen_leaf_bit_identical(case):
    original, before = _flat(case["params"]), _flat(case["adapted"])
    extra = case["extra"]
    for path, leaf in _flat(case["final"]).items():
        if svft_jax.is_node(leaf):
            for field in ("u", "s", "v", "base"):
                assert np.array_equal(getattr(leaf, field), getattr(before[path], field)), (path, field)
            assert np.array_equal(leaf.base, original[path])
            assert np.any(np.asarray(leaf.m) != 0), f"{path}: M never moved"
        elif extra is not None and re.fullmatch(extra, path):
            assert not np.array_equal(leaf, original[path]), f"{path}: the extra head did not train"
        else:
            assert np.array_equal(leaf, original[path]), path


# ----------------------------------------------------------------------------- layouts
def _factor_product(node):
    """U diag(s) Vᵀ per layer, numpy: (*stack, d1, d2)."""
    u, s, v = (np.asarray(a, np.float64) for a in (node.u, node.s, node.v))
    return (u * s[..., None, :]) @ np.swapaxes(v, -1, -2)


@pytest.mark.parametrize("qkv_features", [HIDDEN, 24], ids=["square", "wide"])
def test_attention_kernels_are_heads_times_head_dim_matrices(qkv_features):
    params, _, _, _ = _linen_case(Attention(qkv_features), (BATCH, TOKENS, HIDDEN))
    # Shape inference covers in = heads·head_dim; attention_layouts declares it for any width.
    overrides = svft_models.attention_layouts() if qkv_features != HIDDEN else None
    adapted = svft_jax.apply(params, pattern="plain", overrides=overrides, svd_backend="numpy")
    attention = adapted["MultiHeadDotProductAttention_0"]
    query = np.asarray(params["MultiHeadDotProductAttention_0"]["query"]["kernel"])  # (in, heads, head_dim)
    out = np.asarray(params["MultiHeadDotProductAttention_0"]["out"]["kernel"])  # (heads, head_dim, out)
    w_query = query.reshape(HIDDEN, qkv_features).T  # (heads·head_dim, in)
    w_out = out.reshape(qkv_features, HIDDEN).T  # (out, heads·head_dim)
    for node, w in ((attention["query"]["kernel"], w_query), (attention["out"]["kernel"], w_out)):
        assert node.meta.layout.stack_shape == ()
        assert node.meta.rank == min(w.shape)
        np.testing.assert_allclose(_factor_product(node), w, atol=1e-5)


def test_scanned_kernels_get_one_svd_per_layer():
    params, _, x, kwargs = _case("linen_scan")
    adapted = svft_jax.apply(params, pattern="plain", svd_backend="numpy", **kwargs)
    blocks, kernels = adapted["blocks"], params["blocks"]
    dense = blocks["up"]["kernel"]  # (layers, 16, 32): shape alone would read it as DenseGeneral
    assert dense.meta.layout.stack_shape == (2,) and dense.u.shape == (2, 2 * HIDDEN, HIDDEN)
    np.testing.assert_allclose(_factor_product(dense), np.swapaxes(np.asarray(kernels["up"]["kernel"]), 1, 2), atol=1e-5)
    query = blocks["MultiHeadDotProductAttention_0"]["query"]["kernel"]  # (layers, in, heads, head_dim)
    stored = np.asarray(kernels["MultiHeadDotProductAttention_0"]["query"]["kernel"])
    assert query.meta.layout.stack_shape == (2,)
    np.testing.assert_allclose(_factor_product(query), np.swapaxes(stored.reshape(2, HIDDEN, HIDDEN), 1, 2), atol=1e-5)


@pytest.mark.parametrize("name", ["linen_attention", "nnx_state"])
def test_optimizer_zeroes_full_tree_gradients_of_frozen_leaves(name):
    # Differentiate EVERYTHING (W0 and biases get real gradients; U and V too once M ≠ 0);
    # only the optimiser's labels keep the frozen leaves where they are.
    params, forward, x, kwargs = _case(name)
    kwargs = dict(kwargs)
    extra = kwargs.pop("extra", None)
    adapted = svft_jax.apply(params, pattern="banded", d=1, svd_backend="numpy", **kwargs)
    y = np.random.default_rng(2).standard_normal(np.shape(forward(params, x))).astype(np.float32)
    grads = jax.grad(lambda tree: jnp.mean((forward(svft_jax.merge(tree), x) - y) ** 2))(adapted)
    assert all(np.any(np.asarray(node.base) != 0) for node in _nodes(grads).values())

    tx = svft_jax.optimizer(optax.adam(LR), extra=extra)
    updates, _ = tx.update(grads, tx.init(adapted), adapted)
    stepped = _flat(optax.apply_updates(adapted, updates))
    for path, leaf in _flat(adapted).items():
        if svft_jax.is_node(leaf):
            for field in ("u", "s", "v", "base"):
                assert np.array_equal(getattr(stepped[path], field), getattr(leaf, field)), (path, field)
            assert not np.array_equal(stepped[path].m, leaf.m), path
        else:
            moved = not np.array_equal(stepped[path], leaf)
            assert moved == bool(extra and re.fullmatch(extra, path)), path
