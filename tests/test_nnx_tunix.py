"""SVFT in place on every decoder family tunix ships as an NNX model (Llama3, Qwen2, Qwen3,
Gemma (1/2), Gemma3), trained by Tunix's PeftTrainer and sampled by Tunix's Sampler.

Tiny random models (MLP kernels given random values: Tunix zero-initialises them). Truths:
  * every attention and MLP projection is adapted with no override (Gemma3's k and v share one
    `kv_einsum` weight, one matrix as its einsum 'BSD,CKDH->CBSKH' says; Gemma's q, k and v one
    `qkv_einsum`, 'BTD,SNDH->SBTNH'), the embedding and the head are left out, and the summary
    says why;
  * at M = 0 the logits equal the base model's;
  * logits equal the base model run on kernels merged in numpy float64 from U, s, V and M, and
    the gradient of M equals (Uᵀ G_W V) on Ω from the dense model's own kernel gradient;
  * `PeftTrainer` (no svft-jax code in its loop) trains M only: base weights and U, s, V are
    bit-identical after its steps, and its LoRA-only checkpoint restores M.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("tunix", reason="google-tunix (the `nnx` extra) needs Python ≥ 3.12 and jax ≥ 0.11")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.generate import sampler as sampler_lib  # noqa: E402
from tunix.models.gemma import model as gemma1  # noqa: E402
from tunix.models.gemma3 import model as gemma3  # noqa: E402
from tunix.models.llama3 import model as llama3  # noqa: E402
from tunix.models.qwen2 import model as qwen2  # noqa: E402
from tunix.models.qwen3 import model as qwen3  # noqa: E402
from tunix.sft import peft_trainer  # noqa: E402
from tunix.sft import utils as sft_utils  # noqa: E402

import svft_jax  # noqa: E402
import svft_jax.nnx as snnx  # noqa: E402
from tests import reference  # noqa: E402

# Tunix reads Variables with `.value`, which flax 0.12.12 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning")

VOCAB, EMBED, HIDDEN, HEADS, HEAD_DIM, KV_HEADS, LAYERS = 64, 32, 48, 4, 8, 2, 2
BATCH, TOKENS = 2, 6


def _randomise_mlps(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Linear):
            kernel = module.kernel[...]
            module.kernel.set_value(jnp.asarray(0.2 * rng.standard_normal(kernel.shape), kernel.dtype))
    return model


@functools.cache
def _built(name):
    """Each tiny model is built once per process (building one eagerly compiles every
    initializer: seconds); tests get a clone."""
    return {"llama3": _llama, "qwen2": _qwen2, "qwen3": _qwen, "gemma": _gemma1, "gemma3": _gemma}[name]()


def llama():
    return nnx.clone(_built("llama3"))


def qwen():
    return nnx.clone(_built("qwen3"))


def gemma():
    return nnx.clone(_built("gemma3"))


def _llama():
    config = llama3.ModelConfig(num_layers=LAYERS, vocab_size=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN, num_heads=HEADS,
                                head_dim=HEAD_DIM, num_kv_heads=KV_HEADS, rope_theta=10_000, norm_eps=1e-6)
    return _randomise_mlps(llama3.Llama3(config, rngs=nnx.Rngs(0)))


def _qwen():
    config = qwen3.ModelConfig(num_layers=LAYERS, vocab_size=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN, num_heads=HEADS,
                               head_dim=HEAD_DIM, num_kv_heads=KV_HEADS, rope_theta=10_000, norm_eps=1e-6)
    return _randomise_mlps(qwen3.Qwen3(config, rngs=nnx.Rngs(0)))


def _qwen2():
    config = qwen2.ModelConfig(num_layers=LAYERS, vocab_size=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN, num_heads=HEADS,
                               head_dim=HEAD_DIM, num_kv_heads=KV_HEADS, rope_theta=10_000, norm_eps=1e-6)
    model = _randomise_mlps(qwen2.Qwen2(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)  # Qwen2's q/k/v biases start at zero too
    for layer in model.layers:
        for name in ("q_bias", "k_bias", "v_bias"):
            bias = getattr(layer.attn, name)
            bias.set_value(jnp.asarray(0.2 * rng.standard_normal(bias[...].shape), bias[...].dtype))
    return model


def _gemma1():
    """Gemma 2's architecture (soft caps, post norms, local and global layers) with MHA, so q, k and
    v are one `qkv_einsum` weight."""
    config = gemma1.ModelConfig(num_layers=LAYERS, num_embed=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN, num_heads=HEADS,
                                head_dim=HEAD_DIM, num_kv_heads=HEADS, final_logit_softcap=30.0, use_post_attn_norm=True,
                                use_pre_ffw_norm=True, use_post_ffw_norm=True, attn_logits_soft_cap=50.0,
                                attention_types=(gemma1.AttentionType.LOCAL_SLIDING, gemma1.AttentionType.GLOBAL),
                                sliding_window_size=4)
    return _randomise_mlps(gemma1.Transformer(config, rngs=nnx.Rngs(0)))


def _gemma():
    config = gemma3.ModelConfig(num_layers=LAYERS, num_embed=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN, num_heads=HEADS,
                                head_dim=HEAD_DIM, num_kv_heads=KV_HEADS, sliding_window_size=4, param_dtype=jnp.float32)
    return _randomise_mlps(gemma3.Gemma3(config, rngs=nnx.Rngs(0)))


PROJECTIONS = {
    "llama3": (llama, ("attn/q_proj/w", "attn/k_proj/w", "attn/v_proj/w", "attn/o_proj/w",
                       "mlp/gate_proj/kernel", "mlp/up_proj/kernel", "mlp/down_proj/kernel")),
    "qwen2": (lambda: nnx.clone(_built("qwen2")), ("attn/q_proj/w", "attn/k_proj/w", "attn/v_proj/w", "attn/o_proj/w",
                                                   "mlp/gate_proj/kernel", "mlp/up_proj/kernel", "mlp/down_proj/kernel")),
    "qwen3": (qwen, ("attn/q_proj/w", "attn/k_proj/w", "attn/v_proj/w", "attn/o_proj/w",
                     "mlp/gate_proj/kernel", "mlp/up_proj/kernel", "mlp/down_proj/kernel")),
    "gemma": (lambda: nnx.clone(_built("gemma")), ("attn/qkv_einsum/w", "attn/attn_vec_einsum/w",
                                                   "mlp/gate_proj/kernel", "mlp/up_proj/kernel", "mlp/down_proj/kernel")),
    "gemma3": (gemma, ("attn/q_einsum/w", "attn/kv_einsum/w", "attn/attn_vec_einsum/w",
                       "mlp/gate_proj/kernel", "mlp/up_proj/kernel", "mlp/down_proj/kernel")),
}


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(1, VOCAB, (BATCH, TOKENS)), jnp.int32)
    mask = jnp.ones((BATCH, TOKENS), bool)
    return tokens, sft_utils.build_positions_from_mask(mask), sft_utils.make_causal_attn_mask(mask)


def _logits(model, tokens, positions, attention_mask):
    return model(tokens, positions, None, attention_mask)[0]


def _by_path(state) -> dict:
    return {"/".join(map(str, path)): np.asarray(variable[...]) for path, variable in nnx.to_flat_state(state)}


def _nodes(model) -> dict:
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_flatten_with_path(snnx.to_tree(model), is_leaf=svft_jax.is_node)[0]
            if svft_jax.is_node(x)}


@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_every_projection_is_adapted_with_no_override_and_m_zero_is_the_base(name):
    factory, projections = PROJECTIONS[name]
    base = factory()
    inputs = _inputs()
    model = snnx.adapt(base, snnx.SVFT(pattern=snnx.Banded(d=1)), inputs[0], inputs[1], None, inputs[2])
    report = snnx.report(model)
    assert {t.path for t in report.targets} == {f"layers/{i}/{p}" for i in range(LAYERS) for p in projections}
    left = {x.path: x.reason for x in report.left_out}
    assert "gather" in left["embedder/input_embedding"]
    if not name.startswith("gemma"):  # Gemma decodes with the (tied) embedding
        assert "'lm_head'" in left["lm_head/w"]
    np.testing.assert_allclose(_logits(model, *inputs), _logits(base, *inputs), rtol=1e-5, atol=1e-5)
    if name.startswith("gemma"):  # one matrix for k and v (q, k and v), as the einsum contracts D only
        kv = next(t for t in report.targets if t.path.endswith("kv_einsum/w"))
        assert (kv.layout.in_axes, kv.layout.out_axes) == ((2,), (0, 1, 3))


@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_logits_and_gradients_equal_the_float64_merged_model(name):
    factory, _ = PROJECTIONS[name]
    base = factory()
    tokens, positions, attention_mask = _inputs()
    model = snnx.adapt(base, snnx.SVFT(pattern=snnx.Banded(d=1)), tokens, positions, None, attention_mask)
    rng = np.random.default_rng(1)
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype),
                                   nnx.state(model, nnx.LoRAParam)))
    nodes = _nodes(model)
    dense = reference.dense_nnx_model(base, {path: reference.kernel(node) for path, node in nodes.items()})
    np.testing.assert_allclose(_logits(model, tokens, positions, attention_mask),
                               _logits(dense, tokens, positions, attention_mask), rtol=5e-5, atol=5e-5)
    g = jnp.asarray(np.random.default_rng(2).standard_normal((BATCH, TOKENS, VOCAB)), jnp.float32)

    def loss(model):
        return jnp.sum(_logits(model, tokens, positions, attention_mask) * g)

    grads = _by_path(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model))
    dense_grads = _by_path(nnx.grad(loss)(dense))
    for path, node in nodes.items():
        expected = reference.omega_gradient(node, dense_grads[path])
        np.testing.assert_allclose(grads[f"{path}_svft_m"], expected, rtol=1e-4,
                                   atol=1e-5 * np.abs(expected).max(), err_msg=path)


def test_peft_trainer_trains_only_m_and_its_lora_checkpoint_restores_it(tmp_path):
    base = llama()
    tokens, positions, attention_mask = _inputs()
    model = snnx.adapt(base, snnx.SVFT(pattern=snnx.Banded(d=1)), tokens, positions, None, attention_mask)
    frozen_before = _by_path(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    m_before = _by_path(nnx.state(model, nnx.LoRAParam))

    def model_inputs(x: peft_trainer.TrainingInput):
        mask = x.input_tokens != 0
        return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                "positions": sft_utils.build_positions_from_mask(mask), "attention_mask": sft_utils.make_causal_attn_mask(mask)}

    config = peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=3, checkpoint_root_directory=str(tmp_path),
                                         pbar_description=None)
    trainer = peft_trainer.PeftTrainer(model, optax.adam(1e-2), config).with_gen_model_input_fn(model_inputs)
    assert trainer._lora_enabled  # Tunix found the LoRAParams: it trains with wrt=nnx.LoRAParam
    data = [peft_trainer.TrainingInput(input_tokens=np.asarray(tokens), input_mask=np.ones((BATCH, TOKENS), bool))] * 3
    trainer.train(data)
    trainer.close()  # waits for the (asynchronous) checkpoint
    frozen_after = _by_path(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    assert frozen_after.keys() == frozen_before.keys() and any(k.endswith("_svft_u") for k in frozen_after)
    for path, value in frozen_before.items():
        np.testing.assert_array_equal(frozen_after[path], value, err_msg=path)
    m_after = _by_path(nnx.state(model, nnx.LoRAParam))
    assert all(not np.array_equal(m_after[p], m_before[p]) for p in m_before)
    # a fresh adapted model restores M (only) from Tunix's checkpoint
    fresh = snnx.adapt(base, snnx.SVFT(pattern=snnx.Banded(d=1)), tokens, positions, None, attention_mask)
    restored = peft_trainer.PeftTrainer(fresh, optax.adam(1e-2), config)
    assert restored.train_steps == 3
    for path, value in _by_path(nnx.state(fresh, nnx.LoRAParam)).items():
        np.testing.assert_array_equal(value, m_after[path], err_msg=path)


def test_u_and_v_inherit_the_weight_sharding_names_and_m_is_replicated():
    model = snnx.adapt(llama(), snnx.Rule(path=r"layers/0/attn/q_proj/w", method=snnx.SVFT(pattern=snnx.Banded(d=1))),
                       *_inputs()[:2], None, _inputs()[2])
    q = model.layers[0].attn.q_proj
    names = q.w.get_metadata()["out_sharding"]  # (D, N, H): in (0,), out (1, 2)
    assert q.w_svft_u.get_metadata()["out_sharding"] == (names[1], None)
    assert q.w_svft_v.get_metadata()["out_sharding"] == (names[0], None)
    assert q.w_svft_m.get_metadata()["out_sharding"] == (None,)


@pytest.mark.slow  # ~20 s on 2 shared cores (a PeftTrainer compile); the steps it shows are tested above
def test_the_readme_tunix_example_runs_and_trains_m_only(capsys):
    from tests.test_docs import code_block

    scope: dict = {}
    exec(compile(code_block("docs/nnx.md", "NNX models in place"), "docs/nnx.md#nnx-models-in-place", "exec"), scope)
    out = capsys.readouterr().out
    assert "adapted weights: 14" in out and "lm_head/w" in out and "embedder/input_embedding" in out
    assert scope["trainer"].train_steps == 5
    model = scope["model"]
    assert type(model) is llama3.Llama3 and not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))  # merged


@pytest.mark.slow
def test_bench_nnx_runs_its_three_methods_side_by_side(tmp_path):
    from experiments.bench import nnx as bench_nnx

    report = bench_nnx.main(["--config=tiny", "--repeats=1", f"--output={tmp_path / 'bench.md'}"])
    rows = [line for line in report.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| SVFT banded d=2 (auto)", "| qwix LoRA r=8", "| full FT"]


def test_a_kv_cache_call_equals_the_merged_model():
    """Decoding calls (a KV cache in and out, as Tunix's sampler makes them) run the adapters too."""
    tokens, positions, attention_mask = _inputs()
    model = snnx.adapt(llama(), snnx.SVFT(pattern=snnx.Banded(d=1)), tokens, positions, None, attention_mask)
    nnx.update(model, jax.tree.map(lambda a: a + 0.1, nnx.state(model, nnx.LoRAParam)))
    size = 8
    cache = {f"layer_{i}": {"k": jnp.zeros((BATCH, size, KV_HEADS, HEAD_DIM)), "v": jnp.zeros((BATCH, size, KV_HEADS, HEAD_DIM)),
                            "end_index": jnp.zeros((BATCH,), jnp.int32)} for i in range(LAYERS)}
    mask = jnp.ones((BATCH, TOKENS, size), bool)
    logits, new_cache = nnx.jit(lambda m, t, p, c, a: m(t, p, c, a))(model, tokens, positions, cache, mask)
    merged = snnx.merge(nnx.clone(model))
    want_logits, want_cache = merged(tokens, positions, cache, mask)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_cache["layer_1"]["k"], want_cache["layer_1"]["k"], rtol=1e-5, atol=1e-5)


class _Tokens:
    """A tokenizer over token ids written as text ("5 9 13"): what Tunix's sampler needs
    (encode, decode, bos/eos/pad ids) for a random model with no vocabulary."""

    def encode(self, text, **kwargs):
        return [int(t) for t in text.split()]

    def decode(self, ids, **kwargs):
        return " ".join(map(str, ids))

    def bos_id(self):
        return 1

    def eos_id(self):
        return VOCAB  # outside the vocabulary: generation runs every step

    def pad_id(self):
        return 0


def _greedy(model, prompts=("5 9 13 2", "7 7 30"), steps=8):
    cache = sampler_lib.CacheConfig(cache_size=32, num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    sampler = sampler_lib.Sampler(model, _Tokens(), cache)
    out = sampler(list(prompts), max_generation_steps=steps, max_prompt_length=8, temperature=0.0)
    return [np.asarray(t).tolist() for t in out.tokens], sampler


def test_tunix_sampler_generates_greedily_with_the_adapters_as_the_merged_model_does():
    """Tunix's Sampler (graphdef + state, `nnx.merge` inside its jitted prefill and decode)
    rebuilds the adapted class and runs the adapters: the adapted model's greedy tokens are the
    merged model's, and not the base model's."""
    base = llama()
    tokens, positions, attention_mask = _inputs()
    model = snnx.adapt(base, snnx.SVFT(pattern=snnx.Banded(d=1)), tokens, positions, None, attention_mask)
    rng = np.random.default_rng(1)
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype),
                                   nnx.state(model, nnx.LoRAParam)))
    adapted, sampler = _greedy(model)
    merged, _ = _greedy(snnx.merge(nnx.clone(model)))
    original, _ = _greedy(base)
    assert adapted == merged and all(len(t) == 8 for t in adapted)
    assert adapted != original
    assert snnx.is_adapted(sampler.transformer)  # the sampler's model is the adapted class
    # new M reaches an existing sampler as the whole state (LoRA-only sync: see the next test)
    nnx.update(model, jax.tree.map(lambda a: -a, nnx.state(model, nnx.LoRAParam)))
    sampler.transformer_state = nnx.variables(model)
    synced = sampler(["5 9 13 2", "7 7 30"], max_generation_steps=8, max_prompt_length=8, temperature=0.0)
    assert [np.asarray(t).tolist() for t in synced.tokens] == _greedy(snnx.merge(nnx.clone(model)))[0]


def _set_m(model, seed, scale=0.5):
    """Every adapter's M set to random values, each on its current device placement."""
    rng = np.random.default_rng(seed)
    nnx.update(model, jax.tree.map(
        lambda a: jax.device_put(jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), a.sharding),
        nnx.state(model, nnx.LoRAParam)))


def test_tunix_sampler_lora_only_sync_of_a_new_m_gives_the_merged_models_greedy_tokens():
    """`Sampler.transformer_state = nnx.state(model, nnx.LoRAParam)` (Tunix's LoRA-only sync,
    which wants every variable's type to *be* `nnx.LoRAParam`) takes the adapters' M: a sampler
    built on a clone, synced after M changed, generates the merged model's greedy tokens, and
    not the ones it generated before the sync."""
    tokens, positions, attention_mask = _inputs()
    model = snnx.adapt(llama(), snnx.SVFT(pattern=snnx.Banded(d=1)), tokens, positions, None, attention_mask)
    _set_m(model, seed=1)
    before, sampler = _greedy(nnx.clone(model))
    _set_m(model, seed=2)
    lora = nnx.state(model, nnx.LoRAParam)
    assert {type(v) for v in jax.tree.leaves(lora, is_leaf=lambda x: isinstance(x, nnx.Variable))} == {nnx.LoRAParam}
    sampler.transformer_state = lora
    out = sampler(["5 9 13 2", "7 7 30"], max_generation_steps=8, max_prompt_length=8, temperature=0.0)
    synced = [np.asarray(t).tolist() for t in out.tokens]
    assert synced == _greedy(snnx.merge(nnx.clone(model)))[0]
    assert synced != before
    assert snnx.is_adapted(sampler.transformer)


def _rl_cluster(model, rollout_axes):
    """A Tunix RLCluster (vanilla rollout) with `model` as the actor on a ('fsdp', 'tp') mesh and
    the rollout on a mesh with `rollout_axes`: the same mesh is Tunix's colocated setup."""
    from tunix.rl import rl_cluster as rlc
    from tunix.rl.rollout import base_rollout

    def mesh(axes):
        return jax.make_mesh((1, 1), axes, axis_types=(jax.sharding.AxisType.Auto,) * 2)

    actor = mesh(("fsdp", "tp"))
    rollout = actor if rollout_axes == ("fsdp", "tp") else mesh(rollout_axes)
    config = rlc.ClusterConfig(
        role_to_mesh={rlc.Role.ACTOR: actor, rlc.Role.REFERENCE: actor, rlc.Role.ROLLOUT: rollout},
        rollout_engine="vanilla",
        training_config=rlc.RLTrainingConfig(actor_optimizer=optax.sgd(1e-3), eval_every_n_steps=10, max_steps=1),
        rollout_config=base_rollout.RolloutConfig(max_tokens_to_generate=8, max_prompt_length=8, temperature=0.0,
                                                  top_p=None, kv_cache_size=32))
    return rlc.RLCluster(actor=model, tokenizer=_Tokens(), cluster_config=config)


def _rl_greedy(cluster):
    return [np.asarray(t).tolist() for t in cluster.generate(["5 9 13 2", "7 7 30"]).tokens]


@pytest.mark.slow  # ~10 s on 2 shared cores (an RLCluster and two rollouts)
def test_tunix_rl_colocated_rollout_shares_the_actor_so_generates_the_new_m_with_no_sync():
    """Tunix's RL on one mesh (actor and rollout colocated, its default): the rollout samples the
    actor model itself, so `RLLearner` finds the weights shared (`rl_utils.is_sharing_weights`,
    rl_learner.py) and never syncs; after M changes, the rollout's greedy tokens are the merged
    model's and not the ones before."""
    from tunix.rl import utils as rl_utils

    tokens, positions, attention_mask = _inputs()
    model = snnx.adapt(llama(), snnx.SVFT(pattern=snnx.Banded(d=1)), tokens, positions, None, attention_mask)
    _set_m(model, seed=1)
    cluster = _rl_cluster(model, ("fsdp", "tp"))
    actor = cluster.actor_trainer.model
    assert rl_utils.is_sharing_weights(actor, cluster.rollout.model())
    before = _rl_greedy(cluster)
    _set_m(actor, seed=2)
    after = _rl_greedy(cluster)
    assert after == _greedy(snnx.merge(nnx.clone(actor)))[0]
    assert after != before


@pytest.mark.slow  # ~10 s on 2 shared cores
def test_tunix_rl_disaggregated_vanilla_rollout_sync_is_refused_for_the_frozen_factors():
    """Known limitation (tunix 0.1.x): with the rollout on another mesh, `RLCluster.sync_weights`
    pushes `nnx.state(actor, nnx.LoRAParam)` (accepted) but `VanillaRollout.update_params` then
    sets the sampler's state to `nnx.variables(model, nnx.Param)`, which leaves out U, s, V
    (`AdapterFactor`, not Params, so no Param filter trains them): Tunix refuses it ("same
    structure"). Pinned so that a Tunix that keeps non-Param variables shows up here."""
    tokens, positions, attention_mask = _inputs()
    model = snnx.adapt(llama(), snnx.SVFT(pattern=snnx.Banded(d=1)), tokens, positions, None, attention_mask)
    cluster = _rl_cluster(model, ("tp", "fsdp"))
    _set_m(cluster.actor_trainer.model, seed=2)
    with pytest.raises(ValueError, match="same structure"):
        cluster.sync_weights()
