"""`wrap` through control flow: scan (stacked layers), remat, cond, while, custom_jvp/vjp.

Truth is always the merged model, `apply_fn(svft_jax.merge(adapted), ...)`, under jit and
grad (forward-mode for `while_loop`, which has no reverse mode). The suite runs strict
(pyproject turns `FallbackWarning` into an error), so a kernel that silently fell back to
the dense merged kernel would fail here; the plan is checked to name the strategy, not
"rebuild", for scanned kernels. `slice_layer` is checked against slicing the merged stack.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svft_jax
from svft_jax.strategies import FallbackError, FallbackWarning, slice_layer, wrap
from tests.stack import needs_flax_models
from tests.strategy_checks import assert_same as _assert_same
from tests.strategy_checks import loss_and_grads as _loss_and_grads
from tests.strategy_checks import perturb as _perturb

STRATEGIES = ["factored", "auto", "rebuild", "rebuild_remat", "reference"]
STACKED = {".*layers/.*kernel": {"layout": "stacked_in_out"}}


def _used(plan, path_part):
    return {name for path, names in plan.items() if path_part in path for name in names}


# --------------------------------------------------------------------------- nn.scan stack
class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(12, name="mlp")(h)) + h, None


class _ScanStack(nn.Module):
    """Embed, 3 scanned MLP layers (kernel (3, 12, 12)), head."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(12)(x)
        scanned = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        h, _ = scanned(name="layers")(h, None)
        return nn.Dense(5)(h)


@pytest.fixture(scope="module")
def scan_case():
    net = _ScanStack()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 10)), jnp.float32)
    params = net.init(jax.random.key(0), x)["params"]
    assert params["layers"]["mlp"]["kernel"].shape == (3, 12, 12)
    return (lambda p, x: net.apply({"params": p}, x)), params, x


@pytest.mark.parametrize("pattern,options,strategy", [
    *(("banded", dict(d=1), s) for s in [*STRATEGIES, "spectral"]),  # full rank: spectral applies
    ("topk", dict(k=20), "factored"), ("topk", dict(k=20), "reference"), ("topk", dict(k=20), "spectral"),  # per-layer Ω
])
def test_nn_scan_stack_matches_merged_and_keeps_strategy(scan_case, pattern, options, strategy):
    apply_fn, params, x = scan_case
    adapted = _perturb(svft_jax.apply(params, pattern, init="reference", svd_backend="numpy", overrides=STACKED, **options))
    truth = _loss_and_grads(lambda a: apply_fn(svft_jax.merge(a), x), adapted)
    run = wrap(apply_fn, strategy)
    _assert_same(_loss_and_grads(lambda a: run(a, x), adapted), truth)
    scanned = _used(run.plan(adapted, x), "layers/mlp/kernel")
    # Under auto the full-rank 12×12 layers over 24 tokens are cheaper rebuilt (cost model);
    # every other strategy must reach the scanned kernel itself, not the dense fallback.
    assert scanned == ({"rebuild"} if strategy == "auto" else {strategy}), run.plan(adapted, x)


def test_nn_scan_auto_low_rank_runs_factored_per_layer(scan_case):
    """Rank 2 of 12: auto picks factored inside the scan body, per layer."""
    apply_fn, params, x = scan_case
    adapted = _perturb(svft_jax.apply(params, "plain", rank=2, init="reference", svd_backend="numpy", overrides=STACKED))
    truth = _loss_and_grads(lambda a: apply_fn(svft_jax.merge(a), x), adapted)
    run = wrap(apply_fn, "auto")
    _assert_same(_loss_and_grads(lambda a: run(a, x), adapted), truth)
    assert run.plan(adapted, x)["layers/mlp/kernel"] == ("factored",)


def test_nn_scan_forced_rebuild_of_the_stack_beside_factored_layers(scan_case):
    """A scanned kernel forced to rebuild is merged once for the whole stack (no fallback)."""
    apply_fn, params, x = scan_case
    adapted = _perturb(svft_jax.apply(params, "banded", d=1, init="reference", svd_backend="numpy", overrides=STACKED))
    truth = _loss_and_grads(lambda a: apply_fn(svft_jax.merge(a), x), adapted)
    run = wrap(apply_fn, "factored", overrides={"layers/.*": "rebuild"})
    _assert_same(_loss_and_grads(lambda a: run(a, x), adapted), truth)
    assert run.plan(adapted, x) == {"Dense_0/kernel": ("factored",), "Dense_1/kernel": ("factored",),
                                    "layers/mlp/kernel": ("rebuild",)}


@pytest.mark.parametrize("method,kwargs", [("lora", dict(rank=3)),
                                           pytest.param("dora", dict(rank=2), marks=pytest.mark.slow),
                                           pytest.param("vera", dict(rank=4), marks=pytest.mark.slow)])
def test_nn_scan_baselines_factored_per_layer(scan_case, method, kwargs):
    from svft_jax import baselines

    apply_fn, params, x = scan_case
    adapted = _perturb(baselines.METHODS[method](params, layouts={".*layers/.*kernel": "stacked_in_out"}, **kwargs))
    truth = _loss_and_grads(lambda a: apply_fn(svft_jax.merge(a), x), adapted)
    run = wrap(apply_fn, "factored")
    _assert_same(_loss_and_grads(lambda a: run(a, x), adapted), truth)
    assert run.plan(adapted, x)["layers/mlp/kernel"] == ("factored",)


@pytest.mark.parametrize("pattern,options", [("banded", dict(d=1)), ("topk", dict(k=20))])
def test_slice_layer_equals_slice_of_merged_stack(scan_case, pattern, options):
    """Layer i of the node merges to layer i of the merged stack (top-k: per-layer Ω, written
    on the union of the layers' Ω), for a static and a traced index."""
    _, params, _ = scan_case
    adapted = _perturb(svft_jax.apply(params, pattern, init="reference", svd_backend="numpy", overrides=STACKED, **options))
    node = adapted["layers"]["mlp"]["kernel"]
    assert node.meta.per_layer_indices == (pattern == "topk")
    stack = np.asarray(node.materialize())
    for i in range(3):
        layer = slice_layer(node, i)
        assert layer.meta.layout.shape == (12, 12) and layer.meta.layout.stack_ndim == 0
        np.testing.assert_allclose(layer.materialize(), stack[i], rtol=1e-5, atol=1e-6)
        traced = jax.jit(lambda n, i: slice_layer(n, i).materialize())(node, jnp.int32(i))
        np.testing.assert_allclose(traced, stack[i], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- nn.remat
class _RematNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        block = nn.remat(nn.Dense)
        h = jnp.tanh(block(16, name="inner")(x))
        return nn.Dense(4)(jnp.tanh(block(16, name="inner2")(h)))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nn_remat_block_matches_merged(strategy):
    net = _RematNet()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 8)), jnp.float32)
    params = net.init(jax.random.key(0), x)["params"]
    apply_fn = lambda p, x: net.apply({"params": p}, x)  # noqa: E731
    adapted = _perturb(svft_jax.apply(params, "banded", d=1, rank=4, init="reference", svd_backend="numpy"))
    truth = _loss_and_grads(lambda a: apply_fn(svft_jax.merge(a), x), adapted)
    run = wrap(apply_fn, strategy)
    _assert_same(_loss_and_grads(lambda a: run(a, x), adapted), truth)
    # The remat body really ran (the jaxpr has a checkpoint) and used the strategy.
    assert "remat" in str(jax.make_jaxpr(lambda a: run(a, x))(adapted)) or "checkpoint" in str(jax.make_jaxpr(lambda a: run(a, x))(adapted))
    expected = {"auto": {"factored", "rebuild"}}.get(strategy, {strategy})
    assert _used(run.plan(adapted, x), "inner") <= expected


# --------------------------------------------------------------------------- lax.cond / while
def _dense_params(seed=2):
    rng = np.random.default_rng(seed)
    return {"a": {"kernel": jnp.asarray(rng.standard_normal((8, 8)) / 3, jnp.float32)},
            "b": {"kernel": jnp.asarray(rng.standard_normal((8, 6)) / 3, jnp.float32)}}


def _cond_fn(p, x):
    """Kernel a used in both branches, b after the cond."""
    h = jax.lax.cond(jnp.sum(x) > 0, lambda h: jnp.tanh(h @ p["a"]["kernel"]),
                     lambda h: jnp.sin(h @ p["a"]["kernel"]), x)
    return h @ p["b"]["kernel"]


def _while_fn(p, x):
    """Three iterations of h ↦ tanh(h A) in a while loop (A closed over), then B."""
    def body(carry):
        i, h = carry
        return i + 1, jnp.tanh(h @ p["a"]["kernel"])
    _, h = jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))
    return h @ p["b"]["kernel"]


@pytest.mark.parametrize("strategy,sign", [*((s, 1.0) for s in STRATEGIES), ("factored", -1.0)])
def test_cond_matches_merged(strategy, sign):
    x = sign * jnp.abs(jnp.asarray(np.random.default_rng(3).standard_normal((5, 8)), jnp.float32))
    adapted = _perturb(svft_jax.apply(_dense_params(), "banded", d=1, rank=5, init="reference", svd_backend="numpy", targets=".*kernel"))
    truth = _loss_and_grads(lambda a: _cond_fn(svft_jax.merge(a), x), adapted)
    run = wrap(_cond_fn, strategy)
    _assert_same(_loss_and_grads(lambda a: run(a, x), adapted), truth)
    if strategy == "factored":
        assert run.plan(adapted, x) == {"a/kernel": ("factored",), "b/kernel": ("factored",)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_while_loop_matches_merged_value_and_jvp(strategy):
    """while_loop has no reverse mode: value and forward-mode derivative in m."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal((5, 8)), jnp.float32)
    adapted = _perturb(svft_jax.apply(_dense_params(), "banded", d=1, rank=5, init="reference", svd_backend="numpy", targets=".*kernel"))
    trainable, frozen = svft_jax.split(adapted)
    tangent = jax.tree.map(lambda t: jnp.ones_like(t), trainable)
    run = wrap(_while_fn, strategy)

    def value(fn):
        return jax.jit(lambda t, dt: jax.jvp(lambda t: fn(svft_jax.combine(t, frozen), x), (t,), (dt,)))(trainable, tangent)

    (got, dgot), (want, dwant) = value(run), value(lambda a, x: _while_fn(svft_jax.merge(a), x))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(dgot, dwant, rtol=2e-4, atol=2e-4)
    if strategy == "factored":
        assert run.plan(adapted, x) == {"a/kernel": ("factored",), "b/kernel": ("factored",)}


# --------------------------------------------------------------------------- custom_vjp / jvp
@jax.custom_vjp
def _scaled_grad_matmul(x, w):
    """x @ w whose backward doubles w's cotangent: gradients differ from autodiff's, so only
    a wrap that honours the user's rule can match the merged model."""
    return x @ w


_scaled_grad_matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, 2.0 * res[0].T @ g))


@jax.custom_jvp
def _scaled_tangent_matmul(x, w):
    return x @ w


@_scaled_tangent_matmul.defjvp
def _scaled_tangent_rule(primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    return x @ w, dx @ w + 3.0 * x @ dw


def _custom_fn(p, x):
    h = jnp.tanh(_scaled_grad_matmul(x, p["a"]["kernel"]))
    return _scaled_tangent_matmul(h, p["b"]["kernel"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_custom_vjp_and_jvp_rules_are_honoured(strategy):
    x = jnp.asarray(np.random.default_rng(5).standard_normal((5, 8)), jnp.float32)
    adapted = _perturb(svft_jax.apply(_dense_params(), "banded", d=1, rank=5, init="reference", svd_backend="numpy", targets=".*kernel"))
    truth = _loss_and_grads(lambda a: _custom_fn(svft_jax.merge(a), x), adapted)
    plain = _loss_and_grads(lambda a: (lambda p: jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"])(svft_jax.merge(a)), adapted)
    assert not np.allclose(jax.tree.leaves(truth[1])[0], jax.tree.leaves(plain[1])[0], rtol=1e-2)  # the rules matter
    run = wrap(_custom_fn, strategy)
    _assert_same(_loss_and_grads(lambda a: run(a, x), adapted), truth)
    # The forward call runs the strategy inside both custom functions.
    np.testing.assert_allclose(jax.jit(run)(adapted, x), _custom_fn(svft_jax.merge(adapted), x), rtol=2e-5, atol=2e-5)
    if strategy == "factored":
        assert run.plan(adapted, x) == {"a/kernel": ("factored",), "b/kernel": ("factored",)}


# --------------------------------------------------------------------------- HF checkpointing
@pytest.mark.slow  # 25-55 s: one HF model traced through remat per layer (run by `make test-slow`)
def test_hf_bert_gradient_checkpointing_matches_merged():
    from transformers import BertConfig, FlaxBertForSequenceClassification

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=64)
    model = FlaxBertForSequenceClassification(config, seed=0, gradient_checkpointing=True)
    adapted = _perturb(svft_jax.apply(model.params, "banded", d=2, init="reference", svd_backend="numpy"))
    ids = (np.arange(16, dtype=np.int32).reshape(2, 8) * 7) % 64
    truth = _loss_and_grads(lambda a: model(ids, params=svft_jax.merge(a)).logits, adapted)
    run = wrap(model, "factored", params_argname="params")
    _assert_same(_loss_and_grads(lambda a: run(ids, params=a).logits, adapted), truth)
    assert "remat" in str(jax.make_jaxpr(lambda a: run(ids, params=a).logits)(adapted))
    plan = run.plan(ids, params=adapted)
    layer_paths = [p for p in plan if "/layer/" in p]
    assert layer_paths and all(plan[p] == ("factored",) for p in layer_paths), plan


# --------------------------------------------------------------------------- plan under jit
def test_plan_is_per_call_structure_under_a_jit_cache_hit():
    """Full rank: 512 tokens -> rebuild, 8 tokens -> factored. After a jit cache hit on the
    512-token shape (no Python runs), plan() still answers for that shape; last_plan refuses
    to guess between the two traced structures."""
    net = nn.Dense(64)
    params = net.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
    adapted = svft_jax.apply(params, "plain", svd_backend="numpy")
    run = wrap(lambda p, x: net.apply({"params": p}, x), "auto")
    step = jax.jit(run)
    big, small = jnp.ones((512, 64)), jnp.ones((8, 64))
    step(adapted, big)
    assert run.last_plan == {"kernel": ("rebuild",)}
    step(adapted, small)
    traces = step._cache_size()
    step(adapted, big)  # cache hit: the wrapper's Python does not run
    assert step._cache_size() == traces
    assert run.plan(adapted, big) == {"kernel": ("rebuild",)}
    # Few tokens: the full-rank node runs without W (spectral, the cost model's pick since the
    # three-way auto), many tokens: rebuilt.
    assert run.plan(adapted, small) == {"kernel": ("spectral",)}
    assert run.plan(adapted, jax.ShapeDtypeStruct((4, 64), jnp.float32)) == {"kernel": ("spectral",)}
    with pytest.raises(RuntimeError, match="plan"):
        run.last_plan  # noqa: B018


# --------------------------------------------------------------------------- fallbacks and errors
def _reshaping_fn(p, x):
    """The kernel reshaped before its dot: a use the interpreter cannot factor."""
    w = p["a"]["kernel"].reshape(64).reshape(8, 8)
    return x @ w


def test_fallback_is_a_warning_naming_path_and_primitive_and_strict_raises():
    x = jnp.ones((3, 8))
    adapted = svft_jax.apply(_dense_params(), "plain", rank=4, svd_backend="numpy", targets="a/kernel")
    want = _reshaping_fn(svft_jax.merge(adapted), x)
    with pytest.warns(FallbackWarning, match=r"'a/kernel'.*'factored'.*'reshape'"):
        got = wrap(_reshaping_fn, "factored")(adapted, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # still the merged model
    with pytest.raises(FallbackError, match=r"'a/kernel'.*'reshape'"):
        wrap(_reshaping_fn, "factored", strict=True)(adapted, x)
    assert issubclass(FallbackWarning, UserWarning)
    # A forced rebuild is a choice, not a fallback: no warning (the suite runs with errors).
    np.testing.assert_allclose(wrap(_reshaping_fn, "factored", overrides={"a/kernel": "rebuild"})(adapted, x), want, rtol=1e-5)


def test_scan_over_a_non_stack_axis_is_a_reported_fallback():
    """Scanning over the rows of a 2-D kernel slices W, not layers: dense, and said so."""
    adapted = svft_jax.apply(_dense_params(), "plain", rank=4, svd_backend="numpy", targets="a/kernel")

    def fn(p, x):
        return jax.lax.scan(lambda c, row: (c + row * x, None), jnp.zeros_like(x), p["a"]["kernel"])[0]

    x = jnp.ones((8,))
    with pytest.raises(FallbackError, match=r"'a/kernel'.*'scan'.*not a stacked-layer axis"):
        wrap(fn, "factored", strict=True)(adapted, x)


def test_overrides_regex_matching_nothing_raises():
    x = jnp.ones((3, 8))
    adapted = svft_jax.apply(_dense_params(), "plain", rank=4, svd_backend="numpy", targets=".*kernel")
    with pytest.raises(ValueError, match=r"'.*q_proj.*'.*matches no adapted kernel.*'a/kernel'"):
        wrap(_cond_fn, "factored", overrides={".*q_proj.*": "rebuild"})(adapted, x)


@needs_flax_models
def test_hf_model_without_params_argname_is_a_clear_type_error():
    from transformers import BertConfig, FlaxBertModel

    model = FlaxBertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=32), seed=0)
    with pytest.raises(TypeError, match="params_argname='params'"):
        wrap(model, "factored")
    wrap(model, "factored", params_argname="params")  # the fix works


def _scan_closure_fn(p, x):
    """A kernel closed over by a scan body (a loop constant, as `nn.scan` broadcasts params)."""
    h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ p["a"]["kernel"]), None), x, None, length=3)
    return h @ p["b"]["kernel"]


def test_scan_closed_over_kernel_keeps_strategy():
    x = jnp.asarray(np.random.default_rng(6).standard_normal((5, 8)), jnp.float32)
    adapted = _perturb(svft_jax.apply(_dense_params(), "banded", d=1, rank=5, init="reference", svd_backend="numpy", targets=".*kernel"))
    truth = _loss_and_grads(lambda a: _scan_closure_fn(svft_jax.merge(a), x), adapted)
    run = wrap(_scan_closure_fn, "factored")
    _assert_same(_loss_and_grads(lambda a: run(a, x), adapted), truth)
    assert run.plan(adapted, x) == {"a/kernel": ("factored",), "b/kernel": ("factored",)}


def _stacked_params(seed=7):
    rng = np.random.default_rng(seed)
    return {"layers": {"kernel": jnp.asarray(rng.standard_normal((3, 8, 8)) / 3, jnp.float32)}}


def _unrolled_fn(p, x):
    """A Python loop over a stacked kernel: static `w[i]` (slice + squeeze)."""
    for i in range(3):
        x = jnp.tanh(x @ p["layers"]["kernel"][i])
    return x


def _fori_fn(p, x):
    """fori_loop over a stacked kernel: a scan whose body indexes `w[i]` (dynamic_slice)."""
    return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["layers"]["kernel"][i]), x)


@pytest.mark.parametrize("fn", [_unrolled_fn, _fori_fn], ids=["python_loop", "fori_loop"])
@pytest.mark.parametrize("pattern,options", [("banded", dict(d=1)), ("topk", dict(k=20))])
def test_indexed_layers_of_a_stacked_kernel_keep_strategy(fn, pattern, options):
    x = jnp.asarray(np.random.default_rng(8).standard_normal((5, 8)), jnp.float32)
    adapted = _perturb(svft_jax.apply(_stacked_params(), pattern, init="reference", svd_backend="numpy",
                                      targets=".*kernel", overrides=STACKED, **options))
    truth = _loss_and_grads(lambda a: fn(svft_jax.merge(a), x), adapted)
    run = wrap(fn, "factored")
    _assert_same(_loss_and_grads(lambda a: run(a, x), adapted), truth)
    assert run.plan(adapted, x) == {"layers/kernel": ("factored",)}


def _einsum_layers_fn(p, x):
    """Each layer's kernel applied to its own slice of x in one batched dot (experts, nn.vmap)."""
    return jnp.tanh(jnp.einsum("lbi,lio->lbo", x, p["layers"]["kernel"]))


class _VmapNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        vmapped = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0)
        return vmapped(8, name="layers")(x)


@pytest.mark.parametrize("strategy", ["factored", "auto", "reference"])
def test_dot_batched_over_the_stack_axis_keeps_strategy(strategy):
    x = jnp.asarray(np.random.default_rng(9).standard_normal((3, 5, 8)), jnp.float32)
    adapted = _perturb(svft_jax.apply(_stacked_params(), "topk", k=20, init="reference", svd_backend="numpy",
                                      targets=".*kernel", overrides=STACKED))
    truth = _loss_and_grads(lambda a: _einsum_layers_fn(svft_jax.merge(a), x), adapted)
    run = wrap(_einsum_layers_fn, strategy)
    _assert_same(_loss_and_grads(lambda a: run(a, x), adapted), truth)
    expected = {"auto": {"rebuild", "factored"}}.get(strategy, {strategy})
    assert set(run.plan(adapted, x)["layers/kernel"]) <= expected


def test_nn_vmap_layers_keep_strategy():
    net = _VmapNet()
    x = jnp.asarray(np.random.default_rng(10).standard_normal((3, 5, 8)), jnp.float32)
    params = net.init(jax.random.key(0), x)["params"]
    assert params["layers"]["kernel"].shape == (3, 8, 8)
    apply_fn = lambda p, x: net.apply({"params": p}, x)  # noqa: E731
    adapted = _perturb(svft_jax.apply(params, "banded", d=1, rank=4, init="reference", svd_backend="numpy", overrides=STACKED))
    truth = _loss_and_grads(lambda a: apply_fn(svft_jax.merge(a), x), adapted)
    run = wrap(apply_fn, "factored")
    _assert_same(_loss_and_grads(lambda a: run(a, x), adapted), truth)
    assert run.plan(adapted, x)["layers/kernel"] == ("factored",)
