"""Model adapters: load Hugging Face Flax checkpoints and pick SVFT targets per architecture.

Loading Hugging Face Flax models (`load_pretrained`, `load_gguf`) needs transformers 4.x: on
transformers ≥ 5 (which removed its Flax models) they raise `FlaxModelsUnavailableError`
saying the two ways out; `has_flax_models()` tells which you have. Tokenizers, configs, GGUF
metadata and tokenizers, targets and generation's helpers work on transformers 4 and 5.

    model, params = svft_jax.models.load_pretrained(svft_jax.models.minilm_path(), "FlaxBertModel")
    adapted = svft_jax.models.adapt(model, params, pattern="banded", d=2)
    out = model(input_ids, params=svft_jax.merge(adapted))

Flax linen and NNX models need no adapter: pass their `params` (or `nnx.split` state) to
`svft_jax.apply` directly; `nnx_layouts(model)`, `attention_layouts` and `stacked_layouts`
declare kernel layouts that the path does not show.

Decoder LLMs offline: `load_pretrained("model.gguf")` (llama.cpp files, e.g. `smollm2_path()`),
`load_gguf_tokenizer(path)`, `load_gguf_tunix(path)` (the same file as a Tunix Llama3 NNX
model, transformers-free), `generate` / `generate_text` (batched KV-cache decoding of an
adapted model); every load makes transformers' Flax Llama/Mistral/Gemma honour
`config.rope_theta` (`honour_rope_theta`).
"""

from svft_jax.models._transformers import FlaxModelsUnavailableError, has_flax_models
from svft_jax.models.generation import (
    GenerationOutput,
    clear_merge_cache,
    generate,
    generate_text,
    left_pad,
)
from svft_jax.models.gguf import gguf_config, load_gguf, load_gguf_tokenizer, smollm2_path
from svft_jax.models.gguf_tunix import load_gguf_tunix, tunix_llama_config
from svft_jax.models.hf import load_pretrained, minilm_path
from svft_jax.models.layouts import attention_layouts, nnx_layouts, stacked_layouts
from svft_jax.models.rope import (
    honour_rope_theta,
    rope_inverse_frequencies,
    rope_theta_of,
    stock_rope,
)
from svft_jax.models.targets import (
    FAMILIES,
    ModelFamily,
    adapt,
    default_overrides,
    default_targets,
    family_of,
    model_type_of,
    supported_model_types,
)

__all__ = [
    "FAMILIES",
    "FlaxModelsUnavailableError",
    "GenerationOutput",
    "ModelFamily",
    "adapt",
    "attention_layouts",
    "default_overrides",
    "default_targets",
    "family_of",
    "clear_merge_cache",
    "generate",
    "generate_text",
    "gguf_config",
    "has_flax_models",
    "honour_rope_theta",
    "left_pad",
    "load_gguf",
    "load_gguf_tokenizer",
    "load_gguf_tunix",
    "load_pretrained",
    "minilm_path",
    "model_type_of",
    "nnx_layouts",
    "rope_inverse_frequencies",
    "rope_theta_of",
    "smollm2_path",
    "stacked_layouts",
    "stock_rope",
    "supported_model_types",
    "tunix_llama_config",
]
