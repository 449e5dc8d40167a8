"""Training helpers: optimisers that respect SVFT's frozen factors."""

from svft_jax.training.optim import optimizer
