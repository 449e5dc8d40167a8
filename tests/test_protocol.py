"""The adapter protocol: a new method written in one file (here, a per-output-unit scale
W = diag(1 + g) W0) gets merge, split, optimizer, wrap, summary and adapter files for free.

Truth: the dense float64 formula diag(1 + g) W0, and the trained values themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import svft_jax
from svft_jax.checkpoint import load_adapter, save_adapter
from svft_jax.transform import METHODS, apply_method


# ---- the toy method: this block is everything a new method needs --------------------------
@dataclasses.dataclass(frozen=True)
class ScalePlan(svft_jax.Plan):
    init: float = 0.0


@svft_jax.adapter_node(method="test_scale")
class ScaleNode(svft_jax.AdapterNode):
    plan_cls = ScalePlan

    gain: Any = svft_jax.trainable_field()  # (*stack, d1)
    base: Any = svft_jax.frozen_field()
    meta: ScalePlan = None

    def delta(self):
        return self.gain[..., :, None] * self.base_matrix()

    def matmul(self, x, *, precision=None, preferred_element_type=None):
        from svft_jax.transform._matmul import base_matmul

        return base_matmul(self.base, self.layout, x, precision, preferred_element_type) * (1 + self.gain)

    @property
    def update_rank(self) -> int:
        return 0

    def describe(self) -> str:
        return "scale"

    @classmethod
    def build(cls, plans, kernels, *, factors=None):
        return {p.path: cls(gain=jnp.full((*p.layout.stack_shape, p.layout.d1), p.init, jnp.float32),
                            base=kernels[p.path], meta=p) for p in plans}


def scale_apply(params, *, targets=None, extra=None):
    return apply_method(params, ScaleNode, lambda t: ScalePlan(path=t.path, layout=t.layout), targets=targets, extra=extra)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _registered_once():
    yield
    METHODS.unregister("test_scale")


def _params():
    g = np.random.default_rng(0)
    return {"dense": {"kernel": jnp.asarray(g.normal(size=(5, 4)), jnp.float32), "bias": jnp.zeros(4)},
            "head": {"kernel": jnp.asarray(g.normal(size=(4, 2)), jnp.float32)}}


def _model(params, x):
    h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    return h @ params["head"]["kernel"]


def _trained(adapted):
    node = adapted["dense"]["kernel"]
    return {**adapted, "dense": {**adapted["dense"], "kernel": dataclasses.replace(node, gain=jnp.arange(4.0) / 10)}}


def test_merge_weight_and_delta_follow_the_dense_formula():
    params = _params()
    adapted = _trained(scale_apply(params, targets="dense/kernel"))
    w0 = np.asarray(params["dense"]["kernel"], np.float64).T
    expected = np.diag(1 + np.arange(4.0) / 10) @ w0
    node = adapted["dense"]["kernel"]
    np.testing.assert_allclose(np.asarray(svft_jax.weight_matrix(node)), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(svft_jax.delta_matrix(node)), expected - w0, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(svft_jax.merge(adapted)["dense"]["kernel"]), expected.T, rtol=1e-6)


def test_optimizer_and_split_train_the_gain_and_the_declared_head_only():
    params = _params()
    adapted = scale_apply(params, targets="dense/kernel", extra="head/.*")
    trainable, frozen = svft_jax.split(adapted)  # no extra= here: the tree carries it
    tx = svft_jax.optimizer(optax.sgd(0.1))
    state = tx.init(trainable)
    x = jnp.ones((3, 5))
    loss = lambda t: jnp.sum(_model(svft_jax.merge(svft_jax.combine(t, frozen)), x) ** 2)  # noqa: E731
    updates, _ = tx.update(jax.grad(loss)(trainable), state, trainable)
    new = svft_jax.combine(optax.apply_updates(trainable, updates), frozen)
    assert not np.allclose(new["dense"]["kernel"].gain, 0)
    assert not np.allclose(new["head"]["kernel"].value, params["head"]["kernel"])  # the head trains
    np.testing.assert_array_equal(new["dense"]["kernel"].base, params["dense"]["kernel"])
    np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])


def test_wrap_factored_equals_the_merged_model():
    adapted = _trained(scale_apply(_params(), targets="dense/kernel"))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)
    wrapped = svft_jax.wrap(_model, "factored")
    np.testing.assert_allclose(np.asarray(wrapped(adapted, x)), np.asarray(_model(svft_jax.merge(adapted), x)), rtol=1e-5, atol=1e-6)
    assert wrapped.last_plan == {"dense/kernel": ("factored",)}


def test_summary_counts_and_adapter_file_round_trip(tmp_path):
    params = _params()
    adapted = _trained(scale_apply(params, targets="dense/kernel", extra="head/.*"))
    text = svft_jax.summary(adapted, print_fn=None)
    assert "scale" in text and "trainable params: 12 || all params: 32" in text  # 4 gains + 8 head
    loaded = load_adapter(save_adapter(tmp_path / "scale.safetensors", adapted), params)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(adapted)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(adapted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_node_missing_a_protocol_method_cannot_be_created():
    with pytest.raises(TypeError, match="abstract"):
        @svft_jax.adapter_node(method="test_incomplete")
        class Incomplete(svft_jax.AdapterNode):
            gain: Any = svft_jax.trainable_field()
            meta: Any = None

        Incomplete(gain=None, meta=None)
    METHODS.unregister("test_incomplete")


def test_extra_conflicting_with_the_declared_trainable_set_is_refused():
    adapted = scale_apply(_params(), targets="dense/kernel", extra="head/.*")
    for call in (lambda: svft_jax.split(adapted, extra="dense/bias"), lambda: svft_jax.count_parameters(adapted, extra="dense/.*")):
        with pytest.raises(ValueError, match="conflicts with the trainable set"):
            call()
    svft_jax.split(adapted, extra="head/kernel")  # the same set, restated: fine


def test_svft_apply_extra_declares_the_head_once_for_split_and_optimizer():
    """issue 8: split(ad) after apply(..., extra=...) holds the head; optimizer(tx) updates it."""
    params = _params()
    adapted = svft_jax.apply(params, "banded", d=1, targets="dense/kernel", extra="head/.*")
    trainable, frozen = svft_jax.split(adapted)
    assert trainable["head"]["kernel"].value is params["head"]["kernel"]
    tx = svft_jax.optimizer(optax.sgd(0.1))
    x = jnp.ones((3, 5))
    loss = lambda t: jnp.sum(_model(svft_jax.merge(svft_jax.combine(t, frozen)), x) ** 2)  # noqa: E731
    updates, _ = tx.update(jax.grad(loss)(trainable), tx.init(trainable), trainable)
    head_update = np.asarray(updates["head"]["kernel"].value)
    np.testing.assert_allclose(head_update, -0.1 * np.asarray(jax.grad(loss)(trainable)["head"]["kernel"].value), rtol=1e-6)
    assert np.abs(head_update).max() > 0
    counts = svft_jax.count_parameters(adapted)
    assert counts["trainable"] == svft_jax.banded_count(4, 1) + 8  # |Ω| of the 4×5 kernel (r = 4) + the head
