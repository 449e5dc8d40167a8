"""Training helpers: optimisers that respect SVFT's frozen factors, jitted train/eval steps,
losses and learning-rate schedules.

    from svft_jax.training import make_train_step, make_eval_step, losses, schedules, optimizer
"""

from svft_jax.training import losses, schedules
from svft_jax.training.losses import (
    LossOutput,
    causal_lm_loss,
    classification_loss,
    regression_loss,
    weighted_mean,
)
from svft_jax.training.optim import optimizer
from svft_jax.training.schedules import make_schedule, warmup_constant, warmup_cosine, warmup_linear
from svft_jax.training.step import (
    AccumulationWeightingWarning,
    make_eval_step,
    make_train_step,
    split_micro_batches,
    train_step_fn,
)

__all__ = [
    "AccumulationWeightingWarning",
    "LossOutput",
    "causal_lm_loss",
    "classification_loss",
    "losses",
    "make_eval_step",
    "make_schedule",
    "make_train_step",
    "optimizer",
    "regression_loss",
    "schedules",
    "split_micro_batches",
    "train_step_fn",
    "warmup_constant",
    "warmup_cosine",
    "warmup_linear",
    "weighted_mean",
]
