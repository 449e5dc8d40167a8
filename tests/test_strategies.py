"""Execution strategies (`svft_jax.strategies.wrap`, in `_wrap.py`): every strategy computes the merged model.

Truth is always `apply_fn(svft_jax.merge(adapted), ...)` (the dense reference) under jit and
grad; the cost model is checked against hand-counted FLOPs.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svft_jax
from svft_jax.strategies import choose_strategy, step_flops, wrap
from tests.stack import needs_flax_models
from tests.strategy_checks import assert_same as _assert_same
from tests.strategy_checks import loss_and_grads as _loss_and_grads


# --------------------------------------------------------------------------- HF models
def _bert():
    from transformers import BertConfig, FlaxBertForSequenceClassification

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, vocab_size=64)
    return FlaxBertForSequenceClassification(config, seed=0), dict(pattern="banded", d=2, init="reference")


def _gpt2():
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16)
    overrides = {".*c_(attn|proj|fc)/kernel": {"layout": "out_in"}}
    return FlaxGPT2LMHeadModel(config, seed=0), dict(pattern="random", k=40, rank=12, overrides=overrides, init="reference")


def _llama():
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, vocab_size=64)
    return FlaxLlamaForCausalLM(config, seed=0), dict(pattern="topk", k=30, rank=8, init="reference")


@pytest.fixture(scope="module", params=[_bert, _gpt2, _llama], ids=["bert", "gpt2", "llama"])
def hf_case(request):
    model, options = request.param()
    adapted = svft_jax.apply(model.params, svd_backend="numpy", **options)
    ids = (np.arange(16, dtype=np.int32).reshape(2, 8) * 7) % 64
    truth = _loss_and_grads(lambda a: model(ids, params=svft_jax.merge(a)).logits, adapted)
    return model, adapted, ids, truth


@needs_flax_models
@pytest.mark.parametrize("strategy", ["factored", "auto"])
def test_hf_strategy_matches_merged_loss_and_grads(hf_case, strategy):
    model, adapted, ids, truth = hf_case
    run = wrap(model, strategy, params_argname="params")
    _assert_same(_loss_and_grads(lambda a: run(ids, params=a).logits, adapted), truth)
    expected = {"auto": {"rebuild", "factored", "spectral"}}.get(strategy, {strategy})
    used = set().union(*map(set, run.last_plan.values()))
    assert used and used <= expected, run.last_plan


@needs_flax_models
def test_bert_module_apply_with_positional_params_dict():
    """`module.apply({'params': p}, ...)`: the adapted tree nested in a positional dict."""
    model, options = _bert()
    adapted = svft_jax.apply(model.params, svd_backend="numpy", **options)
    ids = (np.arange(16, dtype=np.int32).reshape(2, 8) * 7) % 64
    truth = _loss_and_grads(lambda a: model(ids, params=svft_jax.merge(a)).logits, adapted)
    run = wrap(model.module.apply, "factored", params_argnum=0)
    mask = np.ones_like(ids)
    out = lambda a: run({"params": a}, ids, mask, np.zeros_like(ids), np.broadcast_to(np.arange(8), ids.shape), None, deterministic=True).logits  # noqa: E731
    _assert_same(_loss_and_grads(out, adapted), truth)


# --------------------------------------------------------------------------- plain Flax
class _Net(nn.Module):
    """Dense layers plus a multi-axis DenseGeneral (kernel (in, heads, head_dim))."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(24)(x))
        h = nn.DenseGeneral((4, 6))(h).reshape(*h.shape[:-1], 24)
        return nn.Dense(16)(jnp.tanh(h))


# (in, heads, head_dim): a DenseGeneral kernel's axes split either way, so it is declared.
LAYOUTS = {"DenseGeneral_0/kernel": {"layout": "attention_qkv"}}


@pytest.fixture(scope="module")
def flax_case():
    net = _Net()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 7, 20)), jnp.float32)
    params = net.init(jax.random.key(0), x)["params"]
    apply_fn = lambda p, x: net.apply({"params": p}, x)  # noqa: E731
    return apply_fn, params, x


@pytest.mark.parametrize("pattern,options,strategy", [
    ("plain", dict(rank=6), "factored"), ("banded", dict(d=1), "factored"), ("random", dict(k=20, rank=10), "factored"),
    ("banded", dict(d=1), "auto"), ("random", dict(k=20, rank=10), "reference"), ("banded", dict(d=1), "rebuild_remat"),
    ("plain", dict(rank=6), "rebuild"),
])
def test_flax_strategy_matches_merged(flax_case, pattern, options, strategy):
    apply_fn, params, x = flax_case
    adapted = svft_jax.apply(params, pattern, init="reference", svd_backend="numpy", **options, overrides=LAYOUTS)
    truth = _loss_and_grads(lambda a: apply_fn(svft_jax.merge(a), x), adapted)
    _assert_same(_loss_and_grads(lambda a: wrap(apply_fn, strategy)(a, x), adapted), truth)


def test_full_rank_without_base_factored_matches_merged(flax_case):
    apply_fn, params, x = flax_case
    adapted = svft_jax.apply(params, "banded", d=1, keep_base=False, init="reference", svd_backend="numpy", overrides=LAYOUTS)
    truth = _loss_and_grads(lambda a: apply_fn(svft_jax.merge(a), x), adapted)
    _assert_same(_loss_and_grads(lambda a: wrap(apply_fn, "factored")(a, x), adapted), truth)


def test_factored_never_forms_a_dense_update(flax_case):
    """Under `factored` no intermediate of the gradient's jaxpr has a target's W shape."""
    apply_fn, params, x = flax_case
    adapted = svft_jax.apply(params, "plain", rank=3, init="reference", svd_backend="numpy", overrides=LAYOUTS)
    trainable, frozen = svft_jax.split(adapted)
    shapes = {tuple(n.meta.layout.shape) for n in jax.tree.leaves(adapted, is_leaf=svft_jax.is_node) if svft_jax.is_node(n)}
    shapes |= {(n[1], n[0]) for n in shapes if len(n) == 2}

    def intermediate_shapes(strategy):
        loss = lambda t: jnp.sum(wrap(apply_fn, strategy)(svft_jax.combine(t, frozen), x))  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable)
        found = set()

        def walk(j):
            for eqn in j.eqns:
                found.update(tuple(v.aval.shape) for v in eqn.outvars)
                for value in eqn.params.values():
                    inner = getattr(value, "jaxpr", None)
                    if inner is not None and hasattr(inner, "eqns"):
                        walk(inner)
        walk(jaxpr.jaxpr)
        return found

    assert intermediate_shapes("rebuild") & shapes  # the check can see a dense W ...
    assert not intermediate_shapes("factored") & shapes  # ... and factored forms none


def test_per_target_override_forces_strategy(flax_case):
    apply_fn, params, x = flax_case
    adapted = svft_jax.apply(params, "plain", rank=4, svd_backend="numpy", overrides=LAYOUTS)
    run = wrap(apply_fn, "factored", overrides={".*DenseGeneral_0/kernel": "rebuild", ".*Dense_1/kernel": "reference"})
    np.testing.assert_allclose(run(adapted, x), apply_fn(svft_jax.merge(adapted), x), rtol=1e-5, atol=1e-5)
    assert run.last_plan == {"Dense_0/kernel": ("factored",), "DenseGeneral_0/kernel": ("rebuild",), "Dense_1/kernel": ("reference",)}


def test_auto_picks_factored_for_low_rank_and_rebuild_for_full_rank():
    """A 256-wide layer over 512 tokens: rank 4 -> factored, full rank -> rebuild."""
    net = nn.Dense(256)
    x = jnp.ones((512, 256))
    params = net.init(jax.random.key(0), x)["params"]
    apply_fn = lambda p, x: net.apply({"params": p}, x)  # noqa: E731
    for rank, expected in [(4, "factored"), (None, "rebuild")]:
        run = wrap(apply_fn, "auto")
        adapted = svft_jax.apply(params, "plain", rank=rank, svd_backend="numpy")
        jax.eval_shape(run, adapted, x)
        assert run.last_plan == {"kernel": (expected,)}


def test_cost_model_matches_hand_counted_flops():
    d1, d2, r, t = 768, 768, 768, 4096
    costs = step_flops(d1, d2, r, t)
    assert costs["rebuild"] == 3 * t * d1 * d2 + 2 * d1 * d2 * r
    assert costs["factored"] == 2 * t * d1 * d2 + t * r * (3 * d1 + 2 * d2)
    assert choose_strategy(d1, d2, r, t) == "rebuild"  # full rank, many tokens
    assert choose_strategy(d1, d2, 8, t) == "factored"  # rank ≪ min(d1, d2)
    assert choose_strategy(d1, d2, r, 64) == "factored"  # full rank but T < d/2
    # boundary: factored iff T·r·(3d1 + 2d2) < T·d1·d2 + 2·d1·d2·r
    for rank in range(1, 400, 7):
        lhs, rhs = t * rank * (3 * d1 + 2 * d2), t * d1 * d2 + 2 * d1 * d2 * rank
        assert choose_strategy(d1, d2, rank, t) == ("factored" if lhs < rhs else "rebuild")
    inference = step_flops(d1, d2, r, t, training=False)
    assert {k: inference[k] for k in ("rebuild", "factored")} == {"rebuild": t * d1 * d2 + d1 * d2 * r, "factored": t * d1 * d2 + t * r * (d1 + d2)}


def test_baseline_nodes_factored_match_merged(flax_case):
    from svft_jax import baselines

    apply_fn, params, x = flax_case
    for name, kwargs in [("lora", dict(rank=3)), ("dora", dict(rank=2)), ("vera", dict(rank=8))]:
        adapted = baselines.METHODS[name](params, layouts={"DenseGeneral_0/kernel": "attention_qkv"}, **kwargs)
        # non-zero B / scale_b so the update is not trivially zero
        adapted = jax.tree.map(lambda n: _perturb(n), adapted, is_leaf=svft_jax.is_node)
        truth = _loss_and_grads(lambda a: apply_fn(svft_jax.merge(a), x), adapted)
        run = wrap(apply_fn, "factored")
        _assert_same(_loss_and_grads(lambda a, run=run: run(a, x), adapted), truth)
        assert set().union(*map(set, run.last_plan.values())) == {"factored"}, name


def _perturb(node):
    if not svft_jax.is_node(node):
        return node
    import dataclasses

    changes = {f: getattr(node, f) + 0.05 for f in node.trainable_fields() if getattr(node, f) is not None}
    return dataclasses.replace(node, **changes)


def test_bfloat16_factors_factored_close_to_merged(flax_case):
    apply_fn, params, x = flax_case
    adapted = svft_jax.apply(params, "banded", d=1, factor_dtype=jnp.bfloat16, init="reference", svd_backend="numpy", overrides=LAYOUTS)
    want = apply_fn(svft_jax.merge(adapted), x)
    got = wrap(apply_fn, "factored")(adapted, x)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2 * float(jnp.max(jnp.abs(want))))


def test_vmap_over_inputs(flax_case):
    apply_fn, params, x = flax_case
    adapted = svft_jax.apply(params, "plain", rank=4, svd_backend="numpy", overrides=LAYOUTS)
    run = wrap(apply_fn, "factored")
    got = jax.vmap(lambda xi: run(adapted, xi))(x)
    np.testing.assert_allclose(got, apply_fn(svft_jax.merge(adapted), x), rtol=1e-5, atol=1e-5)


def test_bad_arguments_fail_early(flax_case):
    apply_fn, params, x = flax_case
    with pytest.raises(ValueError, match="Unknown strategy 'fast'"):
        wrap(apply_fn, "fast")
    with pytest.raises(ValueError, match="Unknown strategy"):
        wrap(apply_fn, overrides={".*": "nope"})
    with pytest.raises(ValueError, match="overrides key"):
        wrap(apply_fn, overrides={"(": "rebuild"})
    adapted = svft_jax.apply(params, "plain", svd_backend="numpy", overrides=LAYOUTS)
    with pytest.raises(TypeError, match="keyword 'params'"):
        wrap(apply_fn, params_argname="params")(adapted, x)
    with pytest.raises(TypeError, match="positional argument 2"):
        wrap(apply_fn, params_argnum=2)(adapted, x)
