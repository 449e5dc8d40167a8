"""Every warning and error class of the library, in one place, so a user can filter or catch
them by importing one module (`svft_jax.errors`); each is also re-exported where it is raised.

The test suite turns the fallback warnings into errors (strict, as lorax's tests do).
"""

from __future__ import annotations


class AccumulationWeightingWarning(UserWarning):
    """A loss_fn gave no count, so micro-batches (and pmap devices) are weighted equally."""


class FallbackWarning(UserWarning):
    """A target kernel is used densely (merged) where its strategy could not run.

    The message names the parameter path, the primitive and why. The result is still the
    merged model's; only speed and memory differ. `wrap(..., strict=True)` raises
    `FallbackError` instead; the test suite turns this warning into an error.
    """


class FallbackError(ValueError):
    """Raised instead of `FallbackWarning` by `wrap(..., strict=True)`."""


class StrategyFallbackWarning(FallbackWarning):
    """A forced strategy cannot run a target as asked and another one (not the dense merge)
    runs it instead, e.g. spectral on a truncated-rank node runs factored."""


class UnsupportedJaxprError(NotImplementedError):
    """An equation's parameters are spelled in a way no supported JAX release uses."""


class PrecisionWarning(UserWarning):
    """A setting that changes the model's weights beyond float32 rounding (e.g. bfloat16
    factors standing in for W0)."""


class RopePatchWarning(UserWarning):
    """A transformers Flax module did not have the structure the RoPE patch expects; it was left as is."""


class FlaxModelsUnavailableError(ImportError):
    """The installed transformers has no Flax model classes (transformers ≥ 5, or none installed)."""


class ExportRecoveryWarning(UserWarning):
    """A merged export interrupted mid-swap (on a file system without atomic exchange) was
    put back at its path by the next call."""


class CheckpointWarning(UserWarning):
    """A checkpoint could be used, but not everything about it could be verified."""


__all__ = [
    "AccumulationWeightingWarning",
    "CheckpointWarning",
    "ExportRecoveryWarning",
    "FallbackError",
    "FallbackWarning",
    "FlaxModelsUnavailableError",
    "PrecisionWarning",
    "RopePatchWarning",
    "StrategyFallbackWarning",
    "UnsupportedJaxprError",
]
