"""Model builders shared by the tasks and the benchmarks (Hugging Face Flax classes).

- `init_tiny(model_class, config, input_shape)`: a random model initialised in ONE jitted call.
- `tiny_bert_classifier(...)`: the driver's built-in demo model.
- `minilm_encoder()`, `new_head(...)`, `mean_pooled_logits(...)`: the sentiment task's
  pretrained all-MiniLM-L6-v2 encoder with a new mean-pooled Dense head.
- `random_bert_classifier(...)`, `random_llama(...)`: the benchmark shapes (MiniLM-shaped
  BERT, a small Llama), randomly initialised.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

import svft_jax

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub: everything here is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def init_tiny(model_class, config, input_shape: tuple[int, ...], seed: int = 0):
    """A randomly initialised HF Flax model whose init runs as ONE jitted call.

    (`model_class(config)` initialises eagerly, compiling every initializer op separately,
    which dominates a smoke test's runtime.) Returns (model, params); pass params explicitly.
    """
    model = model_class(config, seed=seed, _do_init=False)
    params = jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(seed), input_shape)
    return model, params


def tiny_bert_classifier(*, num_layers: int = 2, seq_len: int = 16, vocab_size: int = 64, seed: int = 0):
    """(FlaxBertForSequenceClassification, params): hidden 32, 2 heads, 2 labels, no dropout."""
    from transformers import BertConfig, FlaxBertForSequenceClassification

    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=seq_len, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return init_tiny(FlaxBertForSequenceClassification, config, (1, seq_len), seed)


def minilm_encoder(model_dir=None):
    """(Flax BERT module, pretrained params) of all-MiniLM-L6-v2, offline, without torch."""
    from svft_jax.models import load_pretrained, minilm_path

    model, params = load_pretrained(model_dir or minilm_path(), "FlaxBertModel")
    return model.module, params


def new_head(hidden_size: int, num_classes: int, seed: int) -> dict:
    """A new Dense head: kernel N(0, 0.02²) (BERT's initializer) (hidden, classes), bias 0."""
    kernel = 0.02 * jax.random.normal(jax.random.key(seed), (hidden_size, num_classes), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


def mean_pooled_logits(module) -> Callable:
    """forward(adapted, batch) -> logits (B, C): merged encoder, mean pooling, Dense head.

    `adapted` = {"encoder": params with adapter nodes, "classifier": {"kernel", "bias"}};
    `batch` holds input_ids and attention_mask (B, T). Dropout is off (deterministic): every
    method sees the same noise-free model.
    """

    def forward(adapted, batch):
        encoder = svft_jax.merge(adapted["encoder"])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        positions = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
        hidden = module.apply({"params": encoder}, ids, mask, jnp.zeros_like(ids), positions,
                              deterministic=True).last_hidden_state
        weights = mask[..., None].astype(hidden.dtype)
        pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        head = adapted["classifier"]
        return pooled @ head["kernel"] + head["bias"]

    return forward


def random_bert_classifier(seed: int = 0):
    """all-MiniLM-L6-v2's shape (BERT, hidden 384, 6 layers, 12 heads, MLP 1536, vocab 30522),
    random, 2 labels: (model, params)."""
    from transformers import BertConfig, FlaxBertForSequenceClassification

    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                        vocab_size=30522, num_labels=2)
    return init_tiny(FlaxBertForSequenceClassification, config, (1, 8), seed)


def random_llama(*, max_length: int = 256, seed: int = 0):
    """A small random Llama (hidden 512, 8 layers, 8 heads, MLP 1376, vocab 8192): (model, params)."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1376, vocab_size=8192, max_position_embeddings=max_length)
    return init_tiny(FlaxLlamaForCausalLM, config, (1, 8), seed)
