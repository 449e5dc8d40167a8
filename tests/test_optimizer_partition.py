"""Which leaves train: masks, split/combine, the optax wrapper and the summary's counts.

Truths: the set of trainable paths written out by hand, parameter counts from the formulas
(banded |Ω| = r(2d+1) − d(d+1)) and from the original params' sizes, bit-identity of frozen
leaves after real optax steps, and plain SGD arithmetic for the learning rates.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import svft_jax
from svft_jax._paths import path_to_str

HEAD = r"classifier/.*"


def _params():
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return {
        "encoder": {
            "query": {"kernel": normal(8, 6), "bias": normal(6)},   # W 6×8, r = 6
            "value": {"kernel": normal(8, 8), "bias": normal(8)},   # W 8×8, r = 8
            "norm": {"scale": normal(8)},
        },
        "classifier": {"kernel": normal(8, 3), "bias": normal(3)},
    }


# |Ω| by the banded formula with d = 1: r·3 − 2; the value target also has a gate (1 scalar).
QUERY_M, VALUE_M = 6 * 3 - 2, 8 * 3 - 2


def _adapted():
    return svft_jax.apply(
        _params(), "banded", d=1, svd_backend="numpy",
        overrides={"encoder/value/kernel": {"init": "reference"}},
    )


def _paths(tree, keep=lambda x: True):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_to_str(path) for path, leaf in leaves if keep(leaf)}


def _loss(adapted):
    merged = svft_jax.merge(adapted)
    leaves = jax.tree_util.tree_leaves(merged)
    return sum(jnp.sum(jnp.sin(leaf) * (i + 1)) for i, leaf in enumerate(leaves))


# --- masks and labels ------------------------------------------------------------------------

def test_trainable_mask_is_true_exactly_on_m_and_gate():
    mask = svft_jax.trainable_mask(_adapted())
    assert _paths(mask, keep=lambda x: x) == {
        "encoder/query/kernel/m", "encoder/value/kernel/m", "encoder/value/kernel/gate",
    }


def test_trainable_mask_with_extra_adds_exactly_the_head():
    mask = svft_jax.trainable_mask(_adapted(), extra=HEAD)
    assert _paths(mask, keep=lambda x: x) == {
        "encoder/query/kernel/m", "encoder/value/kernel/m", "encoder/value/kernel/gate",
        "classifier/kernel", "classifier/bias",
    }
    assert _paths(mask) == _paths(_adapted())  # a boolean for every leaf, same structure


# --- split / combine -------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [None, HEAD])
def test_split_then_combine_round_trips_exactly(extra):
    adapted = _adapted()
    trainable, frozen = svft_jax.split(adapted, extra=extra)
    restored = svft_jax.combine(trainable, frozen)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(adapted)
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(adapted), strict=True):
        assert got is want  # the same arrays, not copies


def test_split_halves_are_disjoint_and_cover_every_leaf():
    adapted = _adapted()
    trainable, frozen = svft_jax.split(adapted, extra=HEAD)
    train_paths, frozen_paths = _paths(trainable), _paths(frozen)
    assert not train_paths & frozen_paths
    assert train_paths | frozen_paths == _paths(adapted)
    assert train_paths == _paths(svft_jax.trainable_mask(adapted, extra=HEAD), keep=lambda x: x)


# --- optimizer -------------------------------------------------------------------------------

def _state_sizes(state):
    """Sizes of every non-scalar array in an optimiser state (counts are scalars)."""
    return sorted(int(x.size) for x in jax.tree_util.tree_leaves(state) if hasattr(x, "ndim") and x.ndim > 0)


@pytest.mark.parametrize("half", ["full tree", "trainable half"])
def test_frozen_leaves_get_no_optimizer_state(half):
    adapted = _adapted()
    tree = adapted if half == "full tree" else svft_jax.split(adapted, extra=HEAD)[0]
    state = svft_jax.optimizer(optax.adam(1e-2), extra=HEAD).init(tree)
    trainable_sizes = [QUERY_M, VALUE_M, 1, 8 * 3, 3]  # m, m, gate, head kernel, head bias
    # adam keeps two moments per trainable leaf; the gate is a 0-d scalar, so it is
    # filtered with the step counts: its two moments are the only extra 0-d leaves.
    expected = sorted(s for s in trainable_sizes if s > 1) * 2
    assert _state_sizes(state) == sorted(expected)
    scalars = [x for x in jax.tree_util.tree_leaves(state) if hasattr(x, "ndim") and x.ndim == 0]
    assert len(scalars) == 2 + 2 * 1  # step counts of the adapter and extra adams + the gate's moments


def test_frozen_leaves_get_exactly_zero_updates():
    adapted = _adapted()
    tx = svft_jax.optimizer(optax.adam(1e-2), extra=HEAD)
    grads = jax.jit(jax.grad(_loss))(adapted)
    updates, _ = jax.jit(tx.update)(grads, tx.init(adapted), adapted)
    mask = svft_jax.trainable_mask(adapted, extra=HEAD)
    for (path, update), trainable in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                                         jax.tree_util.tree_leaves(mask), strict=True):
        if trainable:
            assert np.any(np.asarray(update) != 0), path_to_str(path)
        else:
            assert not np.any(np.asarray(update)), path_to_str(path)


def test_frozen_leaves_are_bit_identical_after_optax_steps():
    adapted = _adapted()
    before = jax.tree_util.tree_map(np.array, adapted)  # host copies
    tx = svft_jax.optimizer(optax.adamw(1e-2), extra=HEAD)
    state = tx.init(adapted)

    @jax.jit
    def step(params, state):
        grads = jax.grad(_loss)(params)  # gradients reach U, s, V and W0 too
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(3):
        adapted, state = step(adapted, state)
    mask = jax.tree_util.tree_leaves(svft_jax.trainable_mask(adapted, extra=HEAD))
    paths = jax.tree_util.tree_flatten_with_path(adapted)[0]
    for (path, after), old, trainable in zip(paths, jax.tree_util.tree_leaves(before), mask, strict=True):
        name = path_to_str(path)
        if trainable:
            assert not np.array_equal(np.asarray(after), old), f"{name} did not train"
        else:
            assert np.asarray(after).tobytes() == old.tobytes(), f"frozen {name} changed"


def test_extra_leaves_train_at_extra_tx_learning_rate():
    adapted = _adapted()
    trainable, frozen = svft_jax.split(adapted, extra=HEAD)
    adapter_lr, head_lr = 0.1, 0.003
    tx = svft_jax.optimizer(optax.sgd(adapter_lr), extra=HEAD, extra_tx=optax.sgd(head_lr))
    grads = jax.jit(jax.grad(lambda t: _loss(svft_jax.combine(t, frozen))))(trainable)
    updates, _ = jax.jit(tx.update)(grads, tx.init(trainable), trainable)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(np.asarray(updates["classifier"][name]),
                                   -head_lr * np.asarray(grads["classifier"][name]), rtol=1e-6)
    for target in ("query", "value"):
        np.testing.assert_allclose(np.asarray(updates["encoder"][target]["kernel"].m),
                                   -adapter_lr * np.asarray(grads["encoder"][target]["kernel"].m), rtol=1e-6)


def test_without_extra_tx_extra_leaves_use_the_main_optimizer():
    adapted = _adapted()
    trainable, frozen = svft_jax.split(adapted, extra=HEAD)
    tx = svft_jax.optimizer(optax.sgd(0.05), extra=HEAD)
    grads = jax.jit(jax.grad(lambda t: _loss(svft_jax.combine(t, frozen))))(trainable)
    updates, _ = jax.jit(tx.update)(grads, tx.init(trainable), trainable)
    np.testing.assert_allclose(np.asarray(updates["classifier"]["bias"]),
                               -0.05 * np.asarray(grads["classifier"]["bias"]), rtol=1e-6)


# --- summary ---------------------------------------------------------------------------------

def _expected_counts(extra):
    total = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(_params()))
    trainable = QUERY_M + VALUE_M + 1 + (8 * 3 + 3 if extra else 0)
    return trainable, total


@pytest.mark.parametrize("extra", [None, HEAD])
def test_count_parameters_matches_independent_counts(extra):
    trainable, total = _expected_counts(extra)
    counts = svft_jax.count_parameters(_adapted(), extra=extra)
    assert counts == {"trainable": trainable, "total": total, "targets": 2,
                      "percent": pytest.approx(100.0 * trainable / total)}


@pytest.mark.parametrize("extra", [None, HEAD])
def test_summary_prints_rows_and_the_peft_style_total_line(extra):
    printed = []
    text = svft_jax.summary(_adapted(), extra=extra, print_fn=printed.append)
    assert printed == [text]
    trainable, total = _expected_counts(extra)
    lines = text.splitlines()
    assert lines[-1] == (f"trainable params: {trainable:,} || all params: {total:,} || "
                         f"trainable%: {100.0 * trainable / total:.4f} || adapted targets: 2")
    rows = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert set(rows) == {"encoder/query/kernel", "encoder/value/kernel"}
    # columns: path, W shape, method, rank, entries, trainable
    assert rows["encoder/query/kernel"][1:] == ["6×8", "svft-banded(d=1)", "6", str(QUERY_M), str(QUERY_M)]
    assert rows["encoder/value/kernel"][1:] == ["8×8", "svft-banded(d=1)", "8", str(VALUE_M), str(VALUE_M + 1)]


def test_summary_counts_stacked_layers_and_their_gates():
    kernel = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 4)), jnp.float32)
    adapted = svft_jax.apply({"layers": {"kernel": kernel}}, "random", k=5, init="reference", svd_backend="numpy",
                             overrides={"layers/kernel": {"layout": "stacked_in_out"}})
    counts = svft_jax.count_parameters(adapted)
    assert counts["trainable"] == 3 * 5 + 3  # |Ω| per layer + one gate per layer
    assert counts["total"] == 3 * 5 * 4
    node = adapted["layers"]["kernel"]
    assert dataclasses.asdict(node.meta.options)["k"] == 5
