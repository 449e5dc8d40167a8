# ruff: noqa: E402  (the module skips on transformers 5 before importing Flax models)
"""RoPE θ honoured (`svft_jax.models.rope`): transformers' Flax Llama / Mistral / Gemma against a float64 reference.

Truth: RoPE as defined for HF checkpoints (Su et al.; half-split pairs (x[i], x[i + d/2])
rotated by the angle p·θ^(-2i/d)), computed in float64 numpy from the model's own q/k
projections. At positions past 512 with θ = 5e5 the patched models match it; transformers'
stock modules (restored with `stock_rope()`) do not — the test shows the bug exists, so it
fails if the fix is removed. RoPE scaling is checked by its defining properties (linear:
position p with factor f is position p/f unscaled; llama3: high frequencies kept, low ones
divided by the factor).
"""

from tests.stack import skip_module_without_flax_models  # noqa: I001 - before the Flax model imports

skip_module_without_flax_models()

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import (
    FlaxGemmaForCausalLM,
    FlaxLlamaForCausalLM,
    FlaxMistralForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
)

import svft_jax.models as svft_models
from svft_jax.models import rope

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=1024, rope_theta=5e5)
FAMILIES = {
    "llama": (FlaxLlamaForCausalLM, LlamaConfig(**SMALL)),
    "mistral": (FlaxMistralForCausalLM, MistralConfig(**SMALL, sliding_window=None)),
    "gemma": (FlaxGemmaForCausalLM, GemmaConfig(**SMALL, head_dim=8)),  # Gemma: head_dim from the config
}


def rope_reference(x, positions, theta):
    """HF half-split RoPE on (T, heads, d), float64."""
    d = x.shape[-1]
    angle = positions[:, None, None] * theta ** (-np.arange(0, d, 2) / d)
    angle = np.concatenate([angle, angle], axis=-1)
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * np.cos(angle) + rotated * np.sin(angle)


def projections_and_rotated(cls, config, positions):
    """(q, k) before RoPE from the model's own kernels (float64), and the model's rotated (q, k)."""
    model = cls(config, _do_init=False)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32),
                                    model.params_shape_tree)
    ids = rng.integers(0, config.vocab_size, (1, len(positions)))

    @jax.jit
    def captured(params, ids, pos):
        _, state = model.module.apply({"params": params}, ids, jnp.ones_like(ids), pos,
                                      capture_intermediates=True, mutable=["intermediates"])
        layer = state["intermediates"]["model"]["layers"]["0"]
        return layer["input_layernorm"]["__call__"][0], layer["self_attn"]["rotary_emb"]["__call__"][0]

    normed, (key, query) = captured(params, ids, jnp.asarray(positions)[None])
    attn = params["model"]["layers"]["0"]["self_attn"]
    x = np.asarray(normed[0], np.float64)
    d = query.shape[-1]
    q = (x @ np.asarray(attn["q_proj"]["kernel"], np.float64)).reshape(len(positions), -1, d)
    k = (x @ np.asarray(attn["k_proj"]["kernel"], np.float64)).reshape(len(positions), -1, d)
    return (q, k), (np.asarray(query[0], np.float64), np.asarray(key[0], np.float64))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rope_theta_matches_float64_reference_past_512(family):
    cls, config = FAMILIES[family]
    assert family in rope.honour_rope_theta()
    positions = np.arange(600, 1000, 25)
    (q, k), (query, key) = projections_and_rotated(cls, config, positions)
    np.testing.assert_allclose(query, rope_reference(q, positions, 5e5), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(key, rope_reference(k, positions, 5e5), atol=2e-5, rtol=1e-4)
    with rope.stock_rope():  # transformers' own module: base 10000 whatever config.rope_theta says
        assert not rope.is_rope_patched(family)
        (q, _), (stock_query, _) = projections_and_rotated(cls, config, positions)
    assert rope.is_rope_patched(family)
    assert np.abs(stock_query - rope_reference(q, positions, 5e5)).max() > 0.1
    np.testing.assert_allclose(stock_query, rope_reference(q, positions, 1e4), atol=2e-3, rtol=1e-3)


def test_load_pretrained_applies_the_patch(tmp_path):
    with rope.stock_rope():
        assert not rope.is_rope_patched("llama")
        model = FlaxLlamaForCausalLM(FAMILIES["llama"][1], _do_init=False)
        model.save_pretrained(tmp_path, params=jax.tree_util.tree_map(
            lambda s: np.zeros(s.shape, np.float32), model.params_shape_tree))
    with rope.stock_rope():
        svft_models.load_pretrained(tmp_path)
        assert rope.is_rope_patched("llama")  # load_pretrained patched it inside the block
    assert rope.is_rope_patched("llama")


def test_linear_scaling_divides_positions():
    plain = LlamaConfig(rope_theta=1e4)
    scaled = LlamaConfig(rope_theta=1e4, rope_scaling={"rope_type": "linear", "factor": 4.0})
    np.testing.assert_allclose(np.asarray(rope.rope_table(scaled, 16, 400))[::4],
                               np.asarray(rope.rope_table(plain, 16, 100)), atol=1e-6)


def test_llama3_scaling_bands():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    base = rope.rope_inverse_frequencies(LlamaConfig(rope_theta=5e5), 128)
    scaled = rope.rope_inverse_frequencies(LlamaConfig(rope_theta=5e5, rope_scaling=scaling), 128)
    wavelength = 2 * np.pi / base
    short, long = wavelength < 8192 / 4.0, wavelength > 8192 / 1.0
    assert short.any() and long.any() and (~short & ~long).any()
    np.testing.assert_array_equal(scaled[short], base[short])
    np.testing.assert_allclose(scaled[long], base[long] / 8.0)
    middle = ~short & ~long
    assert np.all((scaled[middle] < base[middle]) & (scaled[middle] > base[middle] / 8.0))


def test_unsupported_scaling_and_bad_theta_raise():
    with pytest.raises(ValueError, match="'yarn' is not implemented"):
        rope.rope_inverse_frequencies(LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0}), 16)
    bad = LlamaConfig()
    bad.rope_theta = -1.0
    with pytest.raises(ValueError, match="rope_theta must be positive"):
        rope.rope_inverse_frequencies(bad, 16)
    with pytest.raises(ValueError, match="unknown family"):
        rope.is_rope_patched("gptj")
