"""svft_jax.training: train/eval steps, gradient accumulation, losses and schedules.

Each test compares against an independent truth: a float64 numpy model built from the SVD
factors by hand, finite differences, or the schedule's closed-form formula.
"""

import csv
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import svft_jax
from svft_jax.training import losses, make_eval_step, make_train_step, schedules
from tests.stack import needs_flax_models

HEAD = "head/.*"


def tiny_problem(seed=0, batch_size=16):
    """A 2-layer tanh MLP (8 → 12 → 10) with a 3-class head, adapted with banded SVFT."""
    rng = np.random.default_rng(seed)
    params = {
        "layer1": {"kernel": rng.normal(size=(8, 12)).astype(np.float32) / 3, "bias": np.zeros(12, np.float32)},
        "layer2": {"kernel": rng.normal(size=(12, 10)).astype(np.float32) / 3},
        "head": {"kernel": rng.normal(size=(10, 3)).astype(np.float32) / 3},
    }
    adapted = svft_jax.apply(params, "banded", d=1, svd_backend="numpy")
    # Start from a non-zero M so that every gradient path (incl. through M) is exercised.
    adapted = jax.tree_util.tree_map(
        lambda x: x.__class__(**{**x.__dict__, "m": jnp.asarray(rng.normal(size=x.m.shape) * 0.1, jnp.float32)}) if svft_jax.is_node(x) else x,
        adapted, is_leaf=svft_jax.is_node,
    )
    batch = {"x": rng.normal(size=(batch_size, 8)).astype(np.float32), "y": rng.integers(0, 3, batch_size)}
    return adapted, batch


def forward(params, x):
    hidden = jnp.tanh(x @ params["layer1"]["kernel"] + params["layer1"]["bias"])
    hidden = jnp.tanh(hidden @ params["layer2"]["kernel"])
    return hidden @ params["head"]["kernel"]


def loss_fn(adapted, batch, rng):
    del rng
    return losses.classification_loss(forward(svft_jax.merge(adapted), batch["x"]), batch["y"])


def numpy_kernel(node, m):
    """Kernel (in, out) = W0ᵀ + (U M Vᵀ)ᵀ in float64, with M assembled from Ω by hand."""
    u, v = np.asarray(node.u, np.float64), np.asarray(node.v, np.float64)
    dense_m = np.zeros((node.meta.rank, node.meta.rank))
    np.add.at(dense_m, (node.meta.rows.array, node.meta.cols.array), m)
    return np.asarray(node.base, np.float64) + (u @ dense_m @ v.T).T


def numpy_loss(adapted, batch, m1, m2, head):
    """Mean cross-entropy of the MLP in float64 numpy, from M values and the head kernel."""
    k1 = numpy_kernel(adapted["layer1"]["kernel"], m1)
    k2 = numpy_kernel(adapted["layer2"]["kernel"], m2)
    hidden = np.tanh(np.tanh(batch["x"].astype(np.float64) @ k1) @ k2)
    logits = hidden @ head
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(batch["y"])), batch["y"]].mean()


def m_values(adapted):
    return [np.asarray(adapted[name]["kernel"].m, np.float64) for name in ("layer1", "layer2")]


def test_gradient_step_matches_finite_differences_with_separate_head_lr():
    adapted, batch = tiny_problem()
    lr_m, lr_head = 0.5, 0.05
    tx = svft_jax.optimizer(optax.sgd(lr_m), adapted, extra=HEAD, extra_tx=optax.sgd(lr_head))
    trainable, frozen = svft_jax.split(adapted, extra=HEAD)
    step = make_train_step(loss_fn, tx)
    new_trainable, _, metrics = step(trainable, frozen, tx.init(trainable), batch, jax.random.key(0))

    m1, m2 = m_values(adapted)
    head = np.asarray(adapted["head"]["kernel"], np.float64)
    new = svft_jax.combine(new_trainable, frozen)
    grad_m = [(old - new_m) / lr_m for old, new_m in zip((m1, m2), m_values(new), strict=True)]
    grad_head = (head - np.asarray(new["head"]["kernel"], np.float64)) / lr_head

    eps = 1e-5
    def finite_difference(which, index):
        args = [m1.copy(), m2.copy(), head.copy()]
        args[which][index] += eps
        plus = numpy_loss(adapted, batch, *args)
        args[which][index] -= 2 * eps
        return (plus - numpy_loss(adapted, batch, *args)) / (2 * eps)

    for index in range(m1.size):
        np.testing.assert_allclose(grad_m[0][index], finite_difference(0, index), atol=2e-4)
    for index in range(0, m2.size, 3):
        np.testing.assert_allclose(grad_m[1][index], finite_difference(1, index), atol=2e-4)
    for index in [(0, 0), (3, 1), (9, 2)]:
        np.testing.assert_allclose(grad_head[index], finite_difference(2, index), atol=2e-4)
    np.testing.assert_allclose(metrics["loss"], numpy_loss(adapted, batch, m1, m2, head), rtol=1e-5)
    full_norm = math.sqrt(sum(float(np.sum(g**2)) for g in (*grad_m, grad_head)))
    np.testing.assert_allclose(metrics["grad_norm"], full_norm, rtol=1e-3)


def test_train_step_updates_only_m_and_head_and_stays_in_svft_span():
    adapted, batch = tiny_problem()
    tx = svft_jax.optimizer(optax.adam(1e-2), adapted, extra=HEAD)
    trainable, frozen = svft_jax.split(adapted, extra=HEAD)
    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    step = make_train_step(loss_fn, tx)
    opt_state = tx.init(trainable)
    for i in range(3):
        trainable, opt_state, _ = step(trainable, frozen, opt_state, batch, jax.random.key(i))

    trained = svft_jax.combine(trainable, frozen)
    # Frozen arrays are bit-identical, and the trainable half still holds exactly M and the head.
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen, frozen_before)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]
    assert paths == ["['head']['kernel']", "['layer1']['kernel'].m", "['layer2']['kernel'].m"]
    assert not np.allclose(trained["head"]["kernel"], adapted["head"]["kernel"])
    merged = svft_jax.merge(trained)
    for name in ("layer1", "layer2"):
        node = trained[name]["kernel"]
        assert not np.allclose(node.m, adapted[name]["kernel"].m)
        # The merged kernel moved only by (U M Vᵀ)ᵀ with the new M: the SVFT parametrisation.
        np.testing.assert_allclose(merged[name]["kernel"], numpy_kernel(node, np.asarray(node.m, np.float64)), atol=1e-5)
    np.testing.assert_array_equal(merged["layer1"]["bias"], adapted["layer1"]["bias"])


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_accumulation_of_micro_batches_equals_full_batch_step(optimizer_name):
    adapted, batch = tiny_problem(batch_size=24)
    base = optax.sgd(0.3) if optimizer_name == "sgd" else optax.adamw(1e-2, weight_decay=0.1)
    tx = svft_jax.optimizer(base, adapted, extra=HEAD)
    results = {}
    for n in (1, 4):
        trainable, frozen = svft_jax.split(adapted, extra=HEAD)
        step = make_train_step(loss_fn, tx, accumulation_steps=n)
        opt_state = tx.init(trainable)
        history = []
        for i in range(3):
            trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(i))
            history.append((float(metrics["loss"]), float(metrics["accuracy"]), float(metrics["grad_norm"])))
        results[n] = (trainable, history)
    np.testing.assert_allclose(results[4][1], results[1][1], rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), results[4][0], results[1][0])


def test_micro_batches_are_strided_and_rng_folded_per_micro_batch():
    batch = {"x": np.arange(12).reshape(6, 2)}
    micro = svft_jax.training.split_micro_batches(batch, 3)
    np.testing.assert_array_equal(micro["x"][1], np.array([[2, 3], [8, 9]]))
    seen = []

    def rng_loss(adapted, batch, rng):
        seen.append(None)
        noise = jax.random.uniform(rng, ())
        return jnp.sum(adapted["w"]) * noise, {"noise": noise}

    tx = optax.sgd(1.0)
    trainable = {"w": jnp.ones(2)}
    step = make_train_step(rng_loss, tx, accumulation_steps=2)
    with pytest.warns(svft_jax.training.AccumulationWeightingWarning, match="without a count"):
        _, _, metrics = step(trainable, {"w": None}, tx.init(trainable), {"x": np.zeros((4, 1))}, jax.random.key(7))
    expected = np.mean([jax.random.uniform(jax.random.fold_in(jax.random.key(7), i), ()) for i in range(2)])
    np.testing.assert_allclose(metrics["noise"], expected, rtol=1e-6)


def test_eval_step_matches_direct_metric_call():
    adapted, batch = tiny_problem()
    trainable, frozen = svft_jax.split(adapted, extra=HEAD)

    def metric_fn(adapted, batch):
        loss, metrics = loss_fn(adapted, batch, None)
        return {"loss": loss, **metrics}

    got = make_eval_step(metric_fn)(trainable, frozen, batch)
    m1, m2 = m_values(adapted)
    np.testing.assert_allclose(got["loss"], numpy_loss(adapted, batch, m1, m2, np.asarray(adapted["head"]["kernel"])), rtol=1e-5)
    assert set(got) == {"loss", "accuracy"}


def test_bad_inputs_fail_with_clear_errors():
    adapted, batch = tiny_problem(batch_size=10)
    tx = svft_jax.optimizer(optax.sgd(0.1), adapted)
    trainable, frozen = svft_jax.split(adapted)
    opt_state = tx.init(trainable)
    with pytest.raises(ValueError, match="divisible by accumulation_steps=4"):
        make_train_step(loss_fn, tx, accumulation_steps=4)(trainable, frozen, opt_state, batch, jax.random.key(0))
    with pytest.raises(TypeError, match=r"loss_fn must return \(scalar loss, dict"):
        make_train_step(lambda a, b, r: loss_fn(a, b, r)[0], tx)(trainable, frozen, opt_state, batch, jax.random.key(0))
    with pytest.raises(ValueError, match="accumulation_steps must be a positive int"):
        make_train_step(loss_fn, tx, accumulation_steps=0)
    for donate in [("frozen",), "trainable", None]:
        with pytest.raises(ValueError, match="donate must be"):
            make_train_step(loss_fn, tx, donate=donate)
    with pytest.raises(ValueError, match="count must be a scalar"):
        make_train_step(lambda a, b, r: (*loss_fn(a, b, r), jnp.ones(2)), tx)(trainable, frozen, opt_state, batch, jax.random.key(0))
    with pytest.raises(ValueError, match="`trainable` has no arrays"):
        make_train_step(loss_fn, tx)(jax.tree_util.tree_map(lambda _: None, trainable), adapted, opt_state, batch, jax.random.key(0))


def test_default_donation_keeps_the_callers_trainable_and_opt_state():
    adapted, batch = tiny_problem()
    tx = svft_jax.optimizer(optax.adam(1e-2), adapted)
    trainable, frozen = svft_jax.split(adapted)
    opt_state = tx.init(trainable)
    m_before = np.array(adapted["layer1"]["kernel"].m)
    make_train_step(loss_fn, tx)(trainable, frozen, opt_state, batch, jax.random.key(0))
    np.testing.assert_array_equal(adapted["layer1"]["kernel"].m, m_before)  # not donated
    # The caller's opt_state was donated only through a copy (see test_training_accumulation).
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(opt_state) if isinstance(x, jax.Array))


# ---------------------------------------------------------------------------- losses


def test_classification_loss_matches_numpy_log_softmax_and_respects_mask(rng):
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 0, 1])
    mask = np.array([1, 1, 0, 1, 0, 1])
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -log_probs[np.arange(6), labels]
    loss, metrics = losses.classification_loss(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), labels)
    np.testing.assert_allclose(loss, nll.mean(), rtol=1e-2)
    loss, metrics = losses.classification_loss(logits, labels, mask)
    np.testing.assert_allclose(loss, nll[mask == 1].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], (logits.argmax(-1) == labels)[mask == 1].mean())
    with pytest.raises(ValueError, match="expected logits"):
        losses.classification_loss(logits[None], labels)


def test_causal_lm_loss_shifts_targets_and_masks(rng):
    batch, length, vocab = 2, 5, 7
    logits = rng.normal(size=(batch, length, vocab)).astype(np.float32)
    tokens = rng.integers(0, vocab, size=(batch, length))
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    terms, hits = [], []
    for b in range(batch):
        for t in range(1, length):
            if mask[b, t]:
                row = logits[b, t - 1]
                terms.append(np.log(np.exp(row).sum()) - row[tokens[b, t]])
                hits.append(row.argmax() == tokens[b, t])
    loss, metrics = losses.causal_lm_loss(logits, tokens, mask)
    np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-6)
    np.testing.assert_allclose(metrics["token_accuracy"], np.mean(hits))
    full, _ = losses.causal_lm_loss(logits, tokens)
    all_terms = [np.log(np.exp(logits[b, t - 1]).sum()) - logits[b, t - 1, tokens[b, t]] for b in range(batch) for t in range(1, length)]
    np.testing.assert_allclose(full, np.mean(all_terms), rtol=1e-6)


def test_regression_loss_is_mse(rng):
    predictions, targets = rng.normal(size=(5, 1)), rng.normal(size=5)
    loss, metrics = losses.regression_loss(predictions, targets)
    np.testing.assert_allclose(loss, np.mean((predictions[:, 0] - targets) ** 2), rtol=1e-6)
    assert metrics["mse"] == loss


def test_classification_loss_divides_by_the_weight_sum_even_below_one(rng):
    """Fractional example weights summing to 0.5: the mean is Σ w·nll / 0.5 (not / max(Σ w, 1))."""
    logits = rng.normal(size=(4, 3)).astype(np.float32)
    labels = np.array([2, 0, 1, 1])
    weights = np.array([0.25, 0.0, 0.25, 0.0], np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -log_probs[np.arange(4), labels]
    output = losses.classification_loss(logits, labels, weights)
    np.testing.assert_allclose(output[0], (0.25 * nll[0] + 0.25 * nll[2]) / 0.5, rtol=1e-6)
    np.testing.assert_allclose(output.count, 0.5)
    empty = losses.classification_loss(logits, labels, np.zeros(4))
    assert float(empty[0]) == 0.0 and float(empty.count) == 0.0


def test_losses_ignore_padding_rows_whatever_they_hold(rng):
    logits = rng.normal(size=(3, 4)).astype(np.float32)
    mask = np.array([1, 0, 1])
    loss, _ = losses.classification_loss(logits, np.array([1, -100, 3]), mask)
    reference, _ = losses.classification_loss(logits[[0, 2]], np.array([1, 3]))
    np.testing.assert_allclose(loss, reference, rtol=1e-6)

    def mse(predictions):
        return losses.regression_loss(predictions, np.array([0.5, np.nan, -1.0]), mask)[0]

    predictions = jnp.asarray([0.0, 2.0, 1.0])
    value, grad = jax.value_and_grad(mse)(predictions)
    np.testing.assert_allclose(value, (0.25 + 4.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(grad, [-0.5, 0.0, 2.0], rtol=1e-6)  # d/dp Σ (p − t)² / 2


def test_losses_refuse_wrong_ids_masks_and_dtypes(rng):
    logits = rng.normal(size=(4, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 1])
    cases = [
        (lambda: losses.classification_loss(logits, np.array([0, 3, 1, 1])), ValueError, r"labels must lie in \[0, 3\).*\[3\]"),
        (lambda: losses.classification_loss(logits, np.array([0, -1, 1, 1])), ValueError, r"\[-1\].*mask=0"),
        (lambda: losses.classification_loss(logits, np.array([-100, 1, 2, 1])), ValueError, "HF's -100"),
        (lambda: losses.classification_loss(logits, labels, np.ones((4, 1))), ValueError, r"mask must have the labels' shape \(4,\)"),
        (lambda: losses.classification_loss(logits, labels, np.array([1, -1, 1, 1])), ValueError, "finite and ≥ 0"),
        (lambda: losses.classification_loss(logits, labels, np.array([1, np.nan, 1, 1])), ValueError, "finite and ≥ 0"),
        (lambda: losses.classification_loss(logits, labels.astype(np.float32)), TypeError, "integer class/token ids"),
        (lambda: losses.classification_loss(labels, labels), TypeError, "logits must be floating"),
        (lambda: losses.causal_lm_loss(logits[:, None], np.zeros((4, 1), int)), ValueError, "T ≥ 2"),
        (lambda: losses.causal_lm_loss(logits.reshape(2, 2, 3), np.array([[0, 5], [1, 1]])), ValueError, "tokens must lie in"),
        (lambda: losses.causal_lm_loss(logits.reshape(2, 2, 3), np.ones((2, 2), int), np.ones((2, 3))), ValueError, "mask must have the tokens' shape"),
        (lambda: losses.regression_loss(logits[:, 0], labels, np.ones((4, 1))), ValueError, "mask must have the targets' shape"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()
    # A counted position outside the vocabulary is refused; one under mask 0 is not.
    tokens = np.array([[0, 5], [1, 1]])
    losses.causal_lm_loss(logits.reshape(2, 2, 3), tokens, np.array([[1, 0], [1, 1]]))


def test_inside_jit_a_bad_label_gives_nan_loss_and_zero_gradient(rng):
    """Traced values cannot raise: the batch is made visibly NaN, and does not train."""
    logits = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)

    @jax.jit
    def loss_and_grad(logits, labels):
        return jax.value_and_grad(lambda z: losses.classification_loss(z, labels)[0])(logits)

    good_loss, good_grad = loss_and_grad(logits, jnp.array([0, 1, 2, 1]))
    assert np.isfinite(good_loss) and np.abs(good_grad).sum() > 0
    bad_loss, bad_grad = loss_and_grad(logits, jnp.array([0, 1, 7, 1]))
    assert np.isnan(bad_loss)
    np.testing.assert_array_equal(bad_grad, np.zeros_like(bad_grad))
    output = jax.jit(losses.causal_lm_loss)(logits.reshape(2, 2, 3), jnp.array([[0, -1], [1, 1]]))
    assert np.isnan(output[0]) and np.isnan(output[1]["token_accuracy"]) and float(output.count) == 0.0


# ---------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("warmup", [0, 10])
def test_warmup_linear_follows_the_hand_formula(warmup):
    peak, total = 3e-3, 50
    schedule = schedules.warmup_linear(peak, total, warmup)

    def expected(t):
        if t < warmup:
            return peak * t / warmup
        return peak * max(0.0, 1 - (t - warmup) / (total - warmup))

    for t in [0, 1, 5, 9, 10, 11, 30, 49, 50, 70]:
        np.testing.assert_allclose(schedule(t), expected(t), rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("warmup", [0, 8])
def test_warmup_cosine_follows_the_hand_formula(warmup):
    peak, total = 1e-2, 40
    schedule = schedules.warmup_cosine(peak, total, warmup)

    def expected(t):
        if t < warmup:
            return peak * t / warmup
        progress = min(t - warmup, total - warmup) / (total - warmup)
        return peak * 0.5 * (1 + math.cos(math.pi * progress))

    for t in [0, 3, 7, 8, 9, 20, 39, 40, 60]:
        np.testing.assert_allclose(schedule(t), expected(t), rtol=1e-5, atol=1e-10)


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="warmup_steps"):
        schedules.warmup_linear(1e-3, 10, 11)
    with pytest.raises(ValueError, match="total_steps"):
        schedules.warmup_cosine(1e-3, 0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        schedules.make_schedule("step", 1e-3, 10)
    for bad in [float("nan"), float("inf"), -1e-3]:
        with pytest.raises(ValueError, match="peak_lr must be a finite number ≥ 0"):
            schedules.make_schedule("cosine", bad, 10)
        with pytest.raises(ValueError, match="end_lr must be a finite number ≥ 0"):
            schedules.warmup_linear(1e-3, 10, end_lr=bad)
    with pytest.raises(TypeError, match="peak_lr must be a real number"):
        schedules.warmup_constant("1e-3", 10)
    with pytest.raises(ValueError, match="total_steps"):
        schedules.warmup_linear(1e-3, 10.0)
    # numpy / jax scalars and numpy ints are fine.
    np.testing.assert_allclose(schedules.warmup_linear(np.float32(2.0), np.int64(10))(5), 1.0)
    np.testing.assert_allclose(schedules.warmup_constant(jnp.asarray(0.5), 4)(3), 0.5)
    np.testing.assert_allclose(schedules.make_schedule("constant", 2.0, 10, 4)(2), 1.0)


# ---------------------------------------------------------------------------- the driver


def _driver():
    from experiments.harness import train  # importable from the repo root (pythonpath = ".")

    return train


class RecordingCheckpointManager:
    """Stands in for svft_jax.checkpoint: records what the driver hands over."""

    def __init__(self):
        self.saved, self.restore_calls = [], []

    def save(self, step, trainable, opt_state, metrics):
        self.saved.append((step, jax.tree_util.tree_map(np.array, trainable), dict(metrics)))

    def restore_latest(self, trainable, opt_state):
        self.restore_calls.append(jax.tree_util.tree_structure(trainable))
        return None


@needs_flax_models
def test_driver_trains_tiny_bert_data_parallel_and_writes_logs(tmp_path):
    train = _driver()
    config = train.parse_config(
        ["--config.steps=6", "--config.eval_every=3", "--log_every=2", "--config.batch_size=16",
         f"--config.output_dir={tmp_path}", "--config.progress=false", "--config.head_learning_rate=0.02",
         "--config.eval_at_start=true"],
        train.TrainConfig(learning_rate=5e-2, warmup_fraction=0.0),
    )
    task = train.demo_task(config, num_train=128, num_eval=32, seq_len=8, num_layers=1)
    manager = RecordingCheckpointManager()
    results = train.run(task, config, checkpoint_manager=manager)

    # Logs: the right files and columns, one train row per log_every, one eval row per eval.
    with open(tmp_path / "train_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:5] == ["step", "loss", "grad_norm", "learning_rate", "head_learning_rate"]
    assert {"accuracy", "examples_per_s", "tokens_per_s", "elapsed_s"} <= set(rows[0])
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    np.testing.assert_allclose(float(rows[0]["learning_rate"]), 5e-2 * (1 - 1 / 6), rtol=1e-5)  # linear decay at step 1
    with open(tmp_path / "eval_metrics.csv") as f:
        eval_rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in eval_rows] == [0, 3, 6] and list(eval_rows[0]) == ["step", "accuracy", "loss", "elapsed_s"]
    assert len((tmp_path / "train_metrics.jsonl").read_text().splitlines()) == 3
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["best_step"] == results["best_step"] and summary["config"]["steps"] == 6

    # Training worked: a later eval loss is below the untouched model's (step 0), and best = min.
    eval_losses = [float(r["loss"]) for r in eval_rows]
    assert min(eval_losses[1:]) < eval_losses[0] - 1e-3
    assert results["best_eval"]["loss"] == min(eval_losses)
    best_index = int(np.argmin(eval_losses))
    assert results["best_step"] == [0, 3, 6][best_index]

    # The checkpoint hook: restore asked once, save after each eval with its metrics and only
    # trainable leaves; the returned best M is the one saved at the best step.
    assert len(manager.restore_calls) == 1
    assert [s[0] for s in manager.saved] == [0, 3, 6]
    assert [s[2]["loss"] for s in manager.saved] == eval_losses
    jax.tree_util.tree_map(np.testing.assert_array_equal, results["best_trainable"], manager.saved[best_index][1])
    best_trainable, _ = svft_jax.split(results["adapted"], extra=task.extra)
    jax.tree_util.tree_map(np.testing.assert_array_equal, best_trainable, manager.saved[best_index][1])
    assert len(jax.tree_util.tree_leaves(manager.saved[-1][1])) == len(jax.tree_util.tree_leaves(svft_jax.split(task.adapted, extra=task.extra)[0]))


def test_driver_config_parsing_and_validation():
    train = _driver()
    config = train.parse_config(["--config.max_grad_norm=1.5", "--schedule=cosine", "--config.data_parallel=false", "--config.head_learning_rate=none"])
    assert (config.max_grad_norm, config.schedule, config.data_parallel, config.head_learning_rate) == (1.5, "cosine", False, None)
    with pytest.raises(ValueError, match="unknown config field 'stpes'"):
        train.parse_config(["--config.stpes=3"])
    with pytest.raises(ValueError, match="expects int"):
        train.parse_config(["--config.steps=many"])
    with pytest.raises(ValueError, match="divisible by accumulation_steps"):
        train.TrainConfig(batch_size=10, accumulation_steps=4)
    with pytest.raises(ValueError, match="schedule must be one of"):
        train.TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="log_format"):
        train.TrainConfig(log_format="json,xml")


def _mlp_task(train, adapted, batches, fail_after=None):
    """A Task over the tiny MLP; train_data raises after `fail_after` batches (a crash)."""

    def train_data(epoch):
        for index, batch in enumerate(batches):
            if fail_after is not None and epoch * len(batches) + index >= fail_after:
                raise RuntimeError("simulated crash")
            yield batch

    return train.Task(adapted=adapted, loss_fn=loss_fn, train_data=train_data, eval_data=lambda: batches[:1], extra=HEAD, name="mlp")


def test_driver_resumes_from_the_real_checkpointer_like_an_uninterrupted_run(tmp_path):
    from svft_jax.checkpoint import TrainCheckpointer

    train = _driver()
    adapted, _ = tiny_problem()
    rng = np.random.default_rng(3)
    batches = [{"x": rng.normal(size=(8, 8)).astype(np.float32), "y": rng.integers(0, 3, 8)} for _ in range(3)]
    config = train.TrainConfig(steps=6, batch_size=8, learning_rate=1e-2, eval_every=2, log_every=1, progress=False,
                               data_parallel=False, output_dir=str(tmp_path / "run"), warmup_fraction=0.5)

    uninterrupted = train.run(_mlp_task(train, adapted, batches), dataclasses.replace(config, output_dir=None))
    with TrainCheckpointer(tmp_path / "ckpt") as manager, pytest.raises(RuntimeError, match="simulated crash"):
        train.run(_mlp_task(train, adapted, batches, fail_after=4), config, checkpoint_manager=manager)
    with TrainCheckpointer(tmp_path / "ckpt") as manager:
        assert manager.latest_step() == 4
        resumed = train.run(_mlp_task(train, adapted, batches), config, checkpoint_manager=manager)
        assert manager.all_steps()[-1] == 6

    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), resumed["trainable"], uninterrupted["trainable"])
    # The resumed run appended to the crashed run's logs: steps 1..6 once each, none lost.
    lines = (tmp_path / "run" / "train_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert [json.loads(line)["loss"] for line in lines] == pytest.approx([row["loss"] for row in uninterrupted["history"]["train"]], rel=1e-6)
