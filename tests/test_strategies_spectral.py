"""Spectral execution, the three-way cost model, the authors' reference kernel, `drop_unused_base`
and the rebuild precision policy.

Truths: the merged model `apply_fn(svft_jax.merge(adapted), ...)` under jit+grad (loss and every
trainable gradient), the dense float64 reference of tests/reference.py, multiply-adds counted
by hand from the shapes, and invariance of the spectral output to the stored W0 (it must never
read it).
"""

import dataclasses
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svft_jax
from svft_jax.strategies import (
    StrategyFallbackWarning,
    choose_strategy,
    drop_unused_base,
    step_flops,
    wrap,
)
from svft_jax.transform import _matmul
from svft_jax.transform.svft import PrecisionWarning
from tests import reference
from tests.stack import needs_flax_models
from tests.strategy_checks import assert_same as _assert_same
from tests.strategy_checks import loss_and_grads as _loss_and_grads


def _used(run):
    return set().union(*map(set, run.last_plan.values()))


# --------------------------------------------------------------------------- HF models
def _bert():
    from transformers import BertConfig, FlaxBertForSequenceClassification

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=80, vocab_size=64)
    return FlaxBertForSequenceClassification(config, seed=0), dict(pattern="banded", d=2, init="reference")


def _gpt2():
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16)
    overrides = {".*c_(attn|proj|fc)/kernel": {"layout": "out_in"}}
    return FlaxGPT2LMHeadModel(config, seed=0), dict(pattern="random", k=60, overrides=overrides, init="reference", keep_base=False)


def _llama():
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, vocab_size=64)
    return FlaxLlamaForCausalLM(config, seed=0), dict(pattern="topk", k=50, init="reference")


@needs_flax_models
@pytest.mark.parametrize("case", [_bert, _gpt2, pytest.param(_llama, marks=pytest.mark.slow)], ids=["bert", "gpt2", "llama"])
def test_hf_spectral_matches_merged_loss_and_grads(case):
    model, options = case()
    adapted = svft_jax.apply(model.params, svd_backend="numpy", **options)
    ids = (np.arange(16, dtype=np.int32).reshape(2, 8) * 7) % 64
    truth = _loss_and_grads(lambda a: model(ids, params=svft_jax.merge(a)).logits, adapted)
    run = wrap(model, "spectral", params_argname="params")
    with warnings.catch_warnings():
        warnings.simplefilter("error", StrategyFallbackWarning)
        _assert_same(_loss_and_grads(lambda a: run(ids, params=a).logits, adapted), truth)
    assert _used(run) == {"spectral"}, run.last_plan


# --------------------------------------------------------------------------- linen
class _Net(nn.Module):
    """Dense layers (square, wide, narrow) plus a multi-axis DenseGeneral (in, heads, head_dim)."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(48)(x))
        h = nn.DenseGeneral((4, 6))(h).reshape(*h.shape[:-1], 24)
        return nn.Dense(24)(jnp.tanh(h))


# (in, heads, head_dim) declared: undeclared, a 3-D kernel outside attention paths is read as stacked.
_GENERAL = {".*DenseGeneral_0/kernel": {"layout": {"stack_ndim": 0, "in_axes": (0,), "out_axes": (1, 2)}}}


@pytest.fixture(scope="module")
def flax_case():
    net = _Net()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 7, 20)), jnp.float32)
    params = net.init(jax.random.key(0), x)["params"]
    return (lambda p, x: net.apply({"params": p}, x)), params, x


@pytest.mark.parametrize("pattern,options", [
    ("plain", {}), ("banded", dict(d=2)), pytest.param("banded", dict(d=30), marks=pytest.mark.slow),  # 61 diagonals: 26 s
    ("random", dict(k=25)), ("topk", dict(k=25)),
    ("banded", dict(d=1, keep_base=False)),
])
def test_flax_spectral_matches_merged(flax_case, pattern, options):
    apply_fn, params, x = flax_case
    adapted = svft_jax.apply(params, pattern, init="reference", svd_backend="numpy", overrides=_GENERAL, **options)
    truth = _loss_and_grads(lambda a: apply_fn(svft_jax.merge(a), x), adapted)
    run = wrap(apply_fn, "spectral")
    _assert_same(_loss_and_grads(lambda a: run(a, x), adapted), truth)
    assert _used(run) == {"spectral"}


def test_spectral_never_reads_w0(flax_case):
    """Replacing every stored W0 by zeros changes nothing under spectral (and everything under
    rebuild, so the check can see W0)."""
    apply_fn, params, x = flax_case
    adapted = svft_jax.apply(params, "banded", d=2, init="reference", svd_backend="numpy", overrides=_GENERAL)
    zero = lambda n: dataclasses.replace(n, base=jnp.zeros_like(n.base)) if svft_jax.is_node(n) else n  # noqa: E731
    zeroed = jax.tree.map(zero, adapted, is_leaf=svft_jax.is_node)
    for strategy, same in [("spectral", True), ("rebuild", False)]:
        run = wrap(apply_fn, strategy)
        a, b = _loss_and_grads(lambda t, run=run: run(t, x), adapted), _loss_and_grads(lambda t, run=run: run(t, x), zeroed)
        assert np.allclose(a[0], b[0], rtol=1e-6) == same, strategy


def test_spectral_forms_no_dense_w_and_no_r_by_r_matrix(flax_case):
    """Every matmul of the spectral step multiplies activations (leading token axes 5×7) by a
    factor; a matmul without token axes would be forming W or a dense M from factors."""
    apply_fn, params, x = flax_case
    adapted = svft_jax.apply(params, "banded", d=2, init="reference", svd_backend="numpy", overrides=_GENERAL)
    trainable, frozen = svft_jax.split(adapted)

    def dot_shapes(strategy):
        loss = lambda t: jnp.sum(wrap(apply_fn, strategy)(svft_jax.combine(t, frozen), x))  # noqa: E731
        found = []

        def walk(j):
            for eqn in j.eqns:
                if eqn.primitive.name == "dot_general":
                    found.append(tuple(eqn.outvars[0].aval.shape))
                for value in eqn.params.values():
                    inner = getattr(value, "jaxpr", value)
                    if hasattr(inner, "eqns"):
                        walk(inner)
        walk(jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr)
        return found

    weight_building = lambda shapes: [s for s in shapes if s[:2] != (5, 7)]  # noqa: E731
    assert weight_building(dot_shapes("reference"))  # the check sees W being formed
    assert not weight_building(dot_shapes("spectral")), dot_shapes("spectral")


def test_spectral_on_truncated_rank_falls_back_to_factored_with_a_warning(flax_case):
    apply_fn, params, x = flax_case
    adapted = svft_jax.apply(params, "plain", rank=4, init="reference", svd_backend="numpy", overrides=_GENERAL)
    run = wrap(apply_fn, "spectral")
    with pytest.warns(StrategyFallbackWarning, match="runs 'factored'"):
        got = run(adapted, x)
    np.testing.assert_allclose(got, apply_fn(svft_jax.merge(adapted), x), rtol=1e-5, atol=1e-5)
    assert _used(run) == {"factored"}


def test_spectral_matmul_refuses_a_node_with_a_residual():
    params = {"w": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)), jnp.float32)}}
    node = svft_jax.apply(params, "plain", rank=3, svd_backend="numpy")["w"]["kernel"]
    with pytest.raises(ValueError, match="residual"):
        node.spectral_matmul(jnp.ones((2, 6)))


def test_bfloat16_factors_spectral_error_is_bounded_and_warned(flax_case):
    """bfloat16 U, s, V: spectral uses U Σ Vᵀ in bfloat16 for W0. The output moves by a few 1e-3
    relative (8 mantissa bits), and a stored W0 it ignores is flagged."""
    apply_fn, params, x = flax_case
    adapted = svft_jax.apply(params, "banded", d=2, factor_dtype=jnp.bfloat16, init="reference", svd_backend="numpy", overrides=_GENERAL)
    exact = apply_fn(svft_jax.merge(adapted), x)  # W0 + ΔW, W0 exact
    with pytest.warns(PrecisionWarning, match="ignores the stored W0"):
        got = wrap(apply_fn, "spectral")(adapted, x)
    relative = float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact))
    assert 1e-4 < relative < 3e-2, relative
    run = wrap(apply_fn, "auto")  # auto never picks the inexact spectral for such a node
    run(adapted, x)
    assert "spectral" not in _used(run)


# --------------------------------------------------------------------------- cost model
def test_spectral_flops_match_hand_counts():
    for d1, d2, t, n in [(384, 384, 1024, 1914), (1536, 384, 256, 1914), (384, 1536, 4096, 384)]:
        r = min(d1, d2)
        # forward: x V (T·d2·r), Σ (T·r), M on Ω (T·n), z Uᵀ (T·r·d1)
        forward = t * d2 * r + t * r + t * n + t * r * d1
        # backward: g U (T·d1·r), dz Σ (T·r), dz M (T·n), dM on Ω (T·n), dh Vᵀ (T·r·d2)
        backward = t * d1 * r + t * r + 2 * t * n + t * r * d2
        assert step_flops(d1, d2, r, t, entries=n)["spectral"] == forward + backward
        assert step_flops(d1, d2, r, t, entries=n, training=False)["spectral"] == forward


@pytest.mark.parametrize("d1,d2,rank,tokens,has_base,expected", [
    (1536, 384, 384, 1024, True, "spectral"),   # MLP up: 2Tr(d1+d2) < 3T·d1·d2 at any T
    (384, 1536, 384, 4096, True, "spectral"),   # MLP down
    (384, 384, 384, 1024, True, "rebuild"),     # square, T ≥ 2d: 4Td² > 3Td² + 2d³
    (384, 384, 384, 256, True, "spectral"),     # square, T < 2d
    (2048, 2048, 2048, 1024, True, "spectral"), # square, T < 2d
    (768, 768, 8, 4096, True, "factored"),      # low rank with a residual
    (768, 768, 768, 64, False, "spectral"),     # full rank without W0: spectral < factored
])
def test_auto_choice_is_the_hand_counted_minimum(d1, d2, rank, tokens, has_base, expected):
    n = svft_jax.banded_count(rank, 2)
    dense = d1 * d2
    costs = {"rebuild": 3 * tokens * dense + 2 * dense * rank,
             "factored": (2 * tokens * dense if has_base else 0) + tokens * rank * (3 * d1 + 2 * d2),
             "spectral": 2 * tokens * rank * (d1 + d2) + tokens * (3 * n + 2 * rank)}
    candidates = ("rebuild", "spectral", "factored") if rank == min(d1, d2) or not has_base else ("rebuild", "factored")
    assert min(candidates, key=costs.get) == expected
    assert choose_strategy(d1, d2, rank, tokens, has_base=has_base, entries=n, candidates=candidates) == expected


def test_choose_strategy_rejects_unknown_candidates():
    with pytest.raises(ValueError, match="candidates"):
        choose_strategy(8, 8, 8, 8, candidates=("fast",))


def test_auto_picks_per_call_from_the_token_count():
    """A full-rank 64² layer: spectral below T = 2d = 128 tokens, rebuild above."""
    net = nn.Dense(64)
    params = net.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
    adapted = svft_jax.apply(params, "plain", svd_backend="numpy")
    for tokens, expected in [(32, "spectral"), (512, "rebuild")]:
        run = wrap(lambda p, x: net.apply({"params": p}, x), "auto")
        jax.eval_shape(run, adapted, jnp.ones((tokens, 64)))
        assert run.last_plan == {"kernel": (expected,)}


# --------------------------------------------------------------------------- drop_unused_base
def test_drop_unused_base_frees_w0_exactly_where_no_auto_choice_reads_it(flax_case):
    apply_fn, params, x = flax_case
    adapted = svft_jax.apply(params, "banded", d=1, init="reference", svd_backend="numpy",
                             overrides={".*Dense_1/kernel": {"rank": 5},
                                        ".*DenseGeneral_0/kernel": {"factor_dtype": jnp.bfloat16, **_GENERAL[".*DenseGeneral_0/kernel"]}})
    dropped = drop_unused_base(adapted)
    assert dropped["Dense_0"]["kernel"].base is None and not dropped["Dense_0"]["kernel"].meta.keep_base
    assert dropped["Dense_1"]["kernel"].base is not None  # truncated rank: residual needed
    assert dropped["DenseGeneral_0"]["kernel"].base is not None  # bfloat16 factors
    same_as_apply = svft_jax.apply(params, "banded", d=1, init="reference", svd_backend="numpy", keep_base=False, overrides=_GENERAL)
    assert dropped["Dense_0"]["kernel"].meta == same_as_apply["Dense_0"]["kernel"].meta
    truth = _loss_and_grads(lambda a: apply_fn(svft_jax.merge(a), x), adapted)
    _assert_same(_loss_and_grads(lambda a: wrap(apply_fn, "auto")(a, x), dropped), truth)


# --------------------------------------------------------------------------- reference kernel
@pytest.mark.parametrize("pattern,options", [
    ("banded", dict(d=2)), ("random", dict(k=20)), ("topk", dict(k=10, rank=4)), ("banded", dict(d=1, keep_base=False)),
])
def test_reference_kernel_equals_the_float64_reference(pattern, options):
    rng = np.random.default_rng(4)
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(9, 7)), jnp.float32)},
              "stack": {"kernel": jnp.asarray(rng.normal(size=(3, 7, 6)), jnp.float32)}}
    adapted = svft_jax.apply(params, pattern, init="reference", svd_backend="numpy",
                             overrides={"stack/kernel": {"layout": "stacked_in_out"}} if "keep_base" not in options else None,
                             targets="a/kernel" if "keep_base" in options else None, **options)
    for node in (n for n in jax.tree.leaves(adapted, is_leaf=svft_jax.is_node) if svft_jax.is_node(n)):
        got = jax.jit(lambda n: n.reference_kernel())(node)
        np.testing.assert_allclose(np.asarray(got), reference.kernel(node), rtol=1e-5, atol=1e-5)


def test_reference_kernel_uses_a_sparse_product_not_a_dense_m():
    """The authors' layer keeps M sparse (COO values on Ω): no (r, r) array appears (rank 4 of a
    9×7 kernel, so no factor is r×r either)."""
    params = {"a": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(9, 7)), jnp.float32)}}
    node = svft_jax.apply(params, "banded", d=1, rank=4, svd_backend="numpy")["a"]["kernel"]
    jaxpr = jax.make_jaxpr(lambda n: n.reference_kernel())(node)
    shapes = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars}
    assert (1, 4, 4) not in shapes and (4, 4) not in shapes, shapes
    assert (1, 4, 9) in shapes  # M Vᵀ, the sparse product's (r, d2) result (d2 = 9 inputs)


# --------------------------------------------------------------------------- precision
def test_rebuild_precision_policy():
    assert _matmul.rebuild_precision() == jax.lax.Precision(_matmul.REBUILD_PRECISION[jax.default_backend()])
    assert _matmul.rebuild_precision("default") == "default"  # a call's own precision wins
    with jax.default_matmul_precision("bfloat16"):
        assert _matmul.rebuild_precision() is None  # JAX's own setting wins over the table
    assert _matmul.compute_dtype(jnp.float32, jnp.bfloat16) == jnp.bfloat16
    assert _matmul.compute_dtype(jnp.bfloat16, jnp.float32) == jnp.bfloat16
    assert _matmul.compute_dtype(jnp.float32, jnp.float32) == jnp.float32


def test_bfloat16_factors_stay_bfloat16_in_the_hot_path():
    """No float32 copy of U or V is made per step: every dot reading a factor takes it in bf16."""
    params = {"a": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(16, 12)), jnp.float32)}}
    with pytest.warns(PrecisionWarning):
        node = svft_jax.apply(params, "banded", d=1, factor_dtype=jnp.bfloat16, keep_base=False, svd_backend="numpy")["a"]["kernel"]
    x = jnp.ones((4, 16), jnp.float32)
    for fn in (lambda n, x: n.spectral_matmul(x), lambda n, x: n.matmul(x)):
        loss = lambda m, x, fn=fn: jnp.sum(fn(dataclasses.replace(node, m=m), x))  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(node.m, x)
        dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
        assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
        assert all(e.outvars[0].aval.dtype == jnp.float32 for e in dots)  # float32 accumulation


def test_bfloat16_rebuild_multiplies_in_bfloat16_and_matches_the_stored_factors():
    """delta() with bfloat16 factors: only bfloat16 dots (two passes), yet equal to the float64
    product of the stored factors far below bfloat16's 2⁻⁸ resolution."""
    params = {"a": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(16, 12)), jnp.float32)}}
    node = svft_jax.apply(params, "banded", d=1, factor_dtype=jnp.bfloat16, svd_backend="numpy")["a"]["kernel"]
    node = dataclasses.replace(node, m=jnp.asarray(np.random.default_rng(1).normal(size=node.m.shape), jnp.float32))
    dots = [e for e in jax.make_jaxpr(lambda n: n.delta())(node).jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    want = reference.f64(node.u) @ reference.dense_m(node) @ reference.f64(node.v).T
    got = np.asarray(jax.jit(lambda n: n.delta())(node), np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
