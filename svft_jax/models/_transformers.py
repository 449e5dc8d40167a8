"""Which transformers is installed, and the one refusal for what needs its Flax model classes.

transformers 5 removed every Flax model (FlaxBertModel, FlaxLlamaForCausalLM, ...). What
svft-jax builds on those classes — `load_pretrained` of a Hugging Face checkpoint, the GGUF →
FlaxLlama model, the RoPE θ patch, the tied causal LMs — refuses on transformers ≥ 5 with
`FlaxModelsUnavailableError` before anything else runs. Everything else (tokenizers, configs,
GGUF metadata and tokenizer, targets, adapters on any params) works on transformers 4 and 5.
"""

from __future__ import annotations

import importlib.metadata

from svft_jax.errors import FlaxModelsUnavailableError

__all__ = ["FlaxModelsUnavailableError", "has_flax_models", "require_flax_models", "transformers_version"]


def transformers_version() -> str | None:
    """The installed transformers' version string, or None (read without importing it)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def _major(version: str) -> int:
    head = version.split(".")[0]
    return int(head) if head.isdigit() else 0


def has_flax_models() -> bool:
    """Whether the installed transformers still ships its Flax model classes (4.x)."""
    version = transformers_version()
    return version is not None and _major(version) < 5


def require_flax_models(what: str) -> None:
    """Refuse `what` unless transformers 4.x (with its Flax models) is installed.

    Raises:
      FlaxModelsUnavailableError: naming the installed version, why, and the two ways out.
    """
    version = transformers_version()
    if version is not None and _major(version) < 5:
        return
    found = "transformers is not installed" if version is None else (
        f"transformers {version} is installed, and transformers 5 removed its Flax models")
    raise FlaxModelsUnavailableError(
        f"{what} needs Hugging Face's Flax model classes: {found}. Two ways out: (1) install "
        "svft-jax's `models` extra in its own environment (`pip install 'svft-jax[models]'` pins "
        "transformers>=4.45,<5); (2) use a Flax NNX model (e.g. Tunix's Llama/Qwen/Gemma), which "
        "needs no transformers model classes: svft_jax.apply works on its `nnx.split` state. "
        "Tokenizers, configs, GGUF metadata/tokenizers and svft_jax.models.default_targets work on "
        "transformers 5.")
