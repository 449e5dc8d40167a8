"""What the installed stack offers, for tests that need more than the core library.

transformers 5 removed its Flax model classes: tests that build Hugging Face Flax models skip
with `FLAX_MODELS_REASON` there (`make test-latest`) and run on transformers 4 (`make test`).
"""

import pytest

import svft_jax.models

FLAX_MODELS = svft_jax.models.has_flax_models()
FLAX_MODELS_REASON = ("needs transformers' Flax model classes, which transformers 5 removed "
                      "(svft-jax[models] pins transformers < 5; `make test` runs it)")
needs_flax_models = pytest.mark.skipif(not FLAX_MODELS, reason=FLAX_MODELS_REASON)


def skip_module_without_flax_models() -> None:
    """Call before a test module imports a Flax model class: skips the whole module on transformers 5."""
    if not FLAX_MODELS:
        pytest.skip(FLAX_MODELS_REASON, allow_module_level=True)
