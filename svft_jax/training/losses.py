"""Losses for the paper's tasks: classification (GLUE, ViT), causal LM (GSM-8K, MATH,
commonsense) and regression (STS-B). Each returns `(scalar loss, {metric: scalar})`, the
shape `make_train_step`'s `loss_fn` returns, and computes in float32 whatever the logits'
dtype (bfloat16 logits would lose the log-sum-exp's precision).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def _weighted_mean(values, weights):
    """Σ w·x / max(Σ w, 1): an empty (all-masked) batch gives 0, not NaN."""
    weights = weights.astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def classification_loss(logits, labels, mask=None):
    """Mean softmax cross-entropy and accuracy.

    Args:
      logits: (B, C) unnormalised class scores (any float dtype).
      labels: (B,) int class indices in [0, C).
      mask: optional (B,) bool/0-1 weights; 0 marks padding examples (e.g. the eval set's
        last, padded batch) that count in neither the loss nor the accuracy.
    Returns:
      (loss, {"accuracy": ...}), both float32 scalars.
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"classification_loss: expected logits (B, C) and labels (B,), got {logits.shape} and {labels.shape}.")
    weights = jnp.ones(labels.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return _weighted_mean(per_example, weights), {"accuracy": _weighted_mean(correct, weights)}


def causal_lm_loss(logits, tokens, mask=None):
    """Next-token cross-entropy: logits at position t predict tokens[t + 1].

    Args:
      logits: (B, T, V) scores from the model run on `tokens`.
      tokens: (B, T) int token ids.
      mask: optional (B, T) 0/1; mask[b, t] = 1 if token t is a target (e.g. answer tokens
        only, padding 0). It is shifted with the tokens, so mask[:, 0] is never used. The
        loss is the mean over all target tokens of the batch.
    Returns:
      (loss, {"token_accuracy": ...}), float32 scalars.
    """
    logits = jnp.asarray(logits, jnp.float32)
    tokens = jnp.asarray(tokens)
    if logits.ndim != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"causal_lm_loss: expected logits (B, T, V) and tokens (B, T), got {logits.shape} and {tokens.shape}.")
    if mask is not None and jnp.shape(mask) != tokens.shape:
        raise ValueError(f"causal_lm_loss: mask must have the tokens' shape {tokens.shape}, got {jnp.shape(mask)}.")
    predictions, targets = logits[:, :-1], tokens[:, 1:]
    weights = jnp.ones(targets.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)[:, 1:]
    per_token = optax.softmax_cross_entropy_with_integer_labels(predictions, targets)
    correct = (jnp.argmax(predictions, axis=-1) == targets).astype(jnp.float32)
    return _weighted_mean(per_token, weights), {"token_accuracy": _weighted_mean(correct, weights)}


def regression_loss(predictions, targets, mask=None):
    """Mean squared error (STS-B style regression heads).

    Args:
      predictions: (B,) or (B, 1) model outputs.
      targets: (B,) float targets.
      mask: optional (B,) 0/1 example weights.
    Returns:
      (loss, {"mse": ...}); loss equals the MSE.
    """
    predictions = jnp.asarray(predictions, jnp.float32)
    if predictions.ndim == 2 and predictions.shape[-1] == 1:
        predictions = predictions[:, 0]
    targets = jnp.asarray(targets, jnp.float32)
    if predictions.shape != targets.shape or predictions.ndim != 1:
        raise ValueError(f"regression_loss: expected predictions (B,) or (B, 1) and targets (B,), got {predictions.shape} and {targets.shape}.")
    weights = jnp.ones(targets.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    mse = _weighted_mean((predictions - targets) ** 2, weights)
    return mse, {"mse": mse}
