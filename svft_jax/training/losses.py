"""Losses for the paper's tasks: classification (GLUE, ViT), causal LM (GSM-8K, MATH,
commonsense) and regression (STS-B).

Each returns a `LossOutput`: it unpacks like `(scalar loss, {metric: scalar})`, the shape
`make_train_step`'s `loss_fn` returns, and also carries `.count`, the number (total weight) of
examples or target tokens the loss averages over. The train step uses the count to weight
micro-batches (and devices under `pmap`) so that gradient accumulation optimises exactly the
full batch's objective even when a padding mask leaves micro-batches with very different
numbers of targets. Losses compute in (at least) float32 whatever the logits' dtype (bfloat16
logits would lose the log-sum-exp's precision).

Values are checked where they can be: on concrete arrays (outside `jit`) a label or token id
outside `[0, C)`, a negative or non-finite weight, or a mask of the wrong shape raises
`ValueError`. Inside `jit` the values are not known before the run, so such a batch makes the
loss and metrics NaN (and its gradient zero) instead of silently training on a clamped label;
the step's metrics show it.

A user-written loss gets the same exact accumulation by returning `(loss, metrics, count)`
(or `LossOutput(loss, metrics, count)`), where `loss` is the mean over `count` units; see
`weighted_mean` and `svft_jax.training.make_train_step`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


@jax.tree_util.register_pytree_node_class
class LossOutput(tuple):
    """`(loss, metrics)` with the normaliser: `.count` units (examples, target tokens) averaged.

    A 2-tuple, so `loss, metrics = classification_loss(...)` keeps working; `count` rides along
    as an attribute (and as a pytree child, so the output passes through `jit`). Returning the
    object itself from a `loss_fn` lets the train step weight micro-batches by `count`; a
    loss_fn that takes it apart should return `(loss, metrics, out.count)`.

    Args:
      loss: scalar, the weighted mean over the batch.
      metrics: {name: scalar}, weighted means with the same weights.
      count: scalar, the sum of the weights (0 for an all-padding batch, whose loss is 0).
    """

    def __new__(cls, loss, metrics, count):
        output = super().__new__(cls, (loss, metrics))
        output.count = count
        return output

    def __getnewargs__(self):  # copy, deepcopy and pickle rebuild it through __new__
        return (self[0], self[1], self.count)

    def __repr__(self):
        return f"LossOutput(loss={self[0]!r}, metrics={self[1]!r}, count={self.count!r})"

    def tree_flatten(self):
        return (self[0], self[1], self.count), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(*children)


def _concrete(x):
    """The value as numpy if it is known now (not a tracer inside jit/grad), else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def weighted_mean(values, weights):
    """Σ w·x / Σ w and Σ w: the mean and count a `loss_fn` returns for exact accumulation.

    Rows with weight 0 are dropped entirely (a padding row's NaN or garbage value does not leak
    into the sum), and an all-zero weight vector gives a mean of 0 with count 0, which the
    train step then weights by 0.

    Args:
      values: (...) per-example or per-token values.
      weights: weights of the same shape, ≥ 0 (0/1 masks or example weights).
    Returns:
      (mean, count): float32 (or wider) scalars.
    """
    weights = jnp.asarray(weights)
    dtype = jnp.promote_types(jnp.result_type(values), jnp.float32)
    weights = weights.astype(dtype)
    keep = weights > 0
    total = jnp.sum(jnp.where(keep, values * weights, 0.0))
    count = jnp.sum(weights)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0), count


def _weights(name, mask, shape, what):
    """The (validated) weights of shape `shape`: ones if mask is None."""
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    if jnp.shape(mask) != shape:
        raise ValueError(
            f"{name}: mask must have the {what} shape {shape}, got {jnp.shape(mask)}; pass one "
            "0/1 (or ≥ 0 weight) entry per " + ("example." if len(shape) == 1 else "token.")
        )
    weights = jnp.asarray(mask)
    if not (jnp.issubdtype(weights.dtype, jnp.number) or weights.dtype == jnp.bool_):
        raise TypeError(f"{name}: mask must be bool or numeric, got dtype {weights.dtype}.")
    value = _concrete(weights)
    if value is not None:
        value = value.astype(np.float64)
        if not np.all(np.isfinite(value)) or np.any(value < 0):
            bad = value[~(np.isfinite(value) & (value >= 0))][:5]
            raise ValueError(f"{name}: mask weights must be finite and ≥ 0, got {bad.tolist()}.")
    return weights.astype(jnp.float32)


def _check_ids(name, what, ids, num_classes, weights):
    """Refuse integer ids outside [0, num_classes) on rows that count (weight > 0).

    Returns a traced "all valid" flag (True when checked concretely), the ids with rows of
    weight 0 replaced by 0 (padding may carry -100 or any id), and the weights' validity.
    """
    if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
        raise TypeError(
            f"{name}: {what} must be integer class/token ids, got dtype {jnp.asarray(ids).dtype}; "
            f"cast them with .astype(int)."
        )
    ids = jnp.asarray(ids)
    counted = weights > 0
    value, counted_value = _concrete(ids), _concrete(counted)
    if value is not None and counted_value is not None:
        outside = counted_value & ((value < 0) | (value >= num_classes))
        if np.any(outside):
            raise ValueError(
                f"{name}: {what} must lie in [0, {num_classes}) on every counted position; got "
                f"{np.unique(value[outside])[:5].tolist()}. Mark ignored positions (e.g. HF's -100) "
                "with mask=0 instead."
            )
    in_range = (ids >= 0) & (ids < num_classes)
    valid = jnp.all(in_range | ~counted) & jnp.all(jnp.isfinite(weights) & (weights >= 0))
    return valid, jnp.where(counted & in_range, ids, 0)


def _output(valid, loss, metrics, count) -> LossOutput:
    # Inside jit an invalid batch cannot raise: NaN loss and metrics make it visible, count 0
    # (and jnp.where's zero cotangent for the unselected branch) keep its gradient at zero.
    nan = jnp.asarray(jnp.nan, loss.dtype)
    return LossOutput(
        jnp.where(valid, loss, nan),
        {key: jnp.where(valid, value, nan) for key, value in metrics.items()},
        jnp.where(valid, count, 0.0),
    )


def _float_logits(name, logits):
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{name}: logits must be floating point, got dtype {logits.dtype}.")
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def classification_loss(logits, labels, mask=None) -> LossOutput:
    """Weighted mean softmax cross-entropy and accuracy.

    Args:
      logits: (B, C) unnormalised class scores (any float dtype), C ≥ 1.
      labels: (B,) int class indices in [0, C) (rows of weight 0 may hold anything, e.g. -100).
      mask: optional (B,) bool/0-1 or ≥ 0 float example weights; 0 marks padding examples
        (e.g. the eval set's last, padded batch) that count in neither the loss nor the accuracy.
    Returns:
      LossOutput (loss, {"accuracy": ...}) with count = Σ mask (B without a mask); float32.
    Raises:
      ValueError: wrong shapes, labels out of range, negative/non-finite weights (concrete).
      TypeError: non-integer labels or non-float logits.
    """
    name = "classification_loss"
    logits = _float_logits(name, logits)
    if logits.ndim != 2 or jnp.shape(labels) != logits.shape[:1] or logits.shape[1] < 1:
        raise ValueError(
            f"{name}: expected logits (B, C) with C ≥ 1 and labels (B,), got {logits.shape} and "
            f"{jnp.shape(labels)}."
        )
    weights = _weights(name, mask, logits.shape[:1], "labels'")
    valid, labels = _check_ids(name, "labels", labels, logits.shape[1], weights)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype)
    loss, count = weighted_mean(per_example, weights)
    accuracy, _ = weighted_mean(correct, weights)
    return _output(valid, loss, {"accuracy": accuracy}, count)


def causal_lm_loss(logits, tokens, mask=None) -> LossOutput:
    """Next-token cross-entropy: logits at position t predict tokens[t + 1].

    Args:
      logits: (B, T, V) scores from the model run on `tokens`, T ≥ 2.
      tokens: (B, T) int token ids in [0, V) (where counted).
      mask: optional (B, T) 0/1 (or ≥ 0 weights); mask[b, t] = 1 if token t is a target (e.g.
        answer tokens only, padding 0). It is shifted with the tokens, so mask[:, 0] is never
        used. The loss is the mean over all target tokens of the batch — not the mean of
        per-sequence means — so micro-batches are weighted by their target-token counts.
    Returns:
      LossOutput (loss, {"token_accuracy": ...}) with count = the number of target tokens
      (Σ mask[:, 1:], or B·(T − 1) without a mask); float32.
    Raises:
      ValueError: wrong shapes, T < 2, token ids out of range, bad weights (concrete).
      TypeError: non-integer tokens or non-float logits.
    """
    name = "causal_lm_loss"
    logits = _float_logits(name, logits)
    if logits.ndim != 3 or jnp.shape(tokens) != logits.shape[:2]:
        raise ValueError(
            f"{name}: expected logits (B, T, V) and tokens (B, T), got {logits.shape} and "
            f"{jnp.shape(tokens)}."
        )
    if logits.shape[1] < 2:
        raise ValueError(
            f"{name}: sequences of length T={logits.shape[1]} have no next-token targets; "
            "pass T ≥ 2 tokens per row."
        )
    weights = _weights(name, mask, logits.shape[:2], "tokens'")[:, 1:]
    valid, targets = _check_ids(
        name, "tokens", jnp.asarray(tokens)[:, 1:], logits.shape[2], weights
    )
    predictions = logits[:, :-1]
    per_token = optax.softmax_cross_entropy_with_integer_labels(predictions, targets)
    correct = (jnp.argmax(predictions, axis=-1) == targets).astype(logits.dtype)
    loss, count = weighted_mean(per_token, weights)
    accuracy, _ = weighted_mean(correct, weights)
    return _output(valid, loss, {"token_accuracy": accuracy}, count)


def regression_loss(predictions, targets, mask=None) -> LossOutput:
    """Weighted mean squared error (STS-B style regression heads).

    Args:
      predictions: (B,) or (B, 1) model outputs.
      targets: (B,) float targets (rows of weight 0 may hold NaN).
      mask: optional (B,) 0/1 or ≥ 0 example weights.
    Returns:
      LossOutput (mse, {"mse": mse}) with count = Σ mask (B without a mask).
    Raises:
      ValueError: wrong shapes or bad weights (concrete).
    """
    name = "regression_loss"
    predictions = _float_logits(name, predictions)
    if predictions.ndim == 2 and predictions.shape[-1] == 1:
        predictions = predictions[:, 0]
    targets = jnp.asarray(targets).astype(predictions.dtype)
    if predictions.shape != targets.shape or predictions.ndim != 1:
        raise ValueError(
            f"{name}: expected predictions (B,) or (B, 1) and targets (B,), got "
            f"{predictions.shape} and {targets.shape}."
        )
    weights = _weights(name, mask, targets.shape, "targets'")
    # Padding rows may carry NaN targets: replace them before the square so that neither the
    # value nor its gradient (0 · NaN) sees them.
    targets = jnp.where(weights > 0, targets, 0.0)
    valid = jnp.all(jnp.isfinite(weights) & (weights >= 0))
    mse, count = weighted_mean((predictions - targets) ** 2, weights)
    return _output(valid, mse, {"mse": mse}, count)
