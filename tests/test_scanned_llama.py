"""Every execution strategy on a Llama-shaped model whose blocks are `nn.scan`ned (the way LLMs
are trained in JAX), with and without remat, against the merged model: loss and gradients under
jit + grad, strict (the suite turns `FallbackWarning` into an error), and each stacked kernel
run by the strategy itself, not the dense fallback. The unrolled model with the same weights is
the second truth: scanned and unrolled adapted models agree."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import svft_jax
from experiments.harness import models
from svft_jax.strategies import wrap
from tests.strategy_checks import assert_same, loss_and_grads, perturb

SHAPE = dict(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, mlp=48)
KERNELS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llama():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
    scanned, params = models.linen_llama(**SHAPE, scan=True)
    remat, _ = models.linen_llama(**SHAPE, scan=True, remat=True)
    unrolled, _ = models.linen_llama(**SHAPE, scan=False)
    assert params["layers"]["q_proj"]["kernel"].shape == (2, 32, 32)
    return dict(scanned=scanned, remat=remat, unrolled=unrolled), params, ids


def _adapt(params, **options):
    return perturb(svft_jax.apply(params, targets=models.LINEN_LLAMA_TARGETS, overrides=models.LINEN_LLAMA_STACKED,
                                  init="reference", svd_backend="numpy", **options))


# In the CI suite: the remat'ed scan (the hardest form) under auto; the other pairs compile the
# same body again (10–20 s each on 2 cores), so they are marked slow (`make test-slow`).
FAST = {("remat", "auto")}  # auto runs rebuild and spectral on this model (4 / 3 kernels per layer)
CASES = [pytest.param(form, strategy, marks=() if (form, strategy) in FAST else pytest.mark.slow)
         for form in ("scanned", "remat")
         for strategy in ("rebuild", "rebuild_remat", "factored", "spectral", "auto", "reference")]


@pytest.mark.parametrize("form,strategy", CASES)
def test_scanned_llama_every_strategy_matches_merged(llama, form, strategy):
    apply_fn, params, ids = llama[0][form], llama[1], llama[2]
    adapted = _adapt(params, pattern="banded", d=1)
    truth = loss_and_grads(lambda a: apply_fn(svft_jax.merge(a), ids), adapted)
    run = wrap(apply_fn, strategy, strict=True)
    assert_same(loss_and_grads(lambda a: run(a, ids), adapted), truth)
    plan = run.plan(adapted, ids)
    assert sorted(plan) == sorted(f"layers/{k}/kernel" for k in KERNELS)
    if strategy != "auto":
        assert all(names == (strategy,) for names in plan.values()), plan
    else:  # auto chooses per kernel exactly as on the unrolled model (same shapes, same tokens)
        unrolled = wrap(llama[0]["unrolled"], "auto", strict=True)
        plain = models.unstack_layers(params, SHAPE["layers"])
        per_layer = svft_jax.apply(plain, pattern="banded", d=1, targets=models.LINEN_LLAMA_TARGETS, svd_backend="numpy")
        unrolled_plan = unrolled.plan(per_layer, ids)
        assert plan == {f"layers/{k}/kernel": unrolled_plan[f"layers_0/{k}/kernel"] for k in KERNELS}
        assert {name for names in plan.values() for name in names} <= {"rebuild", "factored", "spectral"}


@pytest.mark.slow  # baselines through nn.scan are in the suite already (test_wrap_control_flow)
@pytest.mark.parametrize("preset", ["lora_r8", "dora_r1", "vera_r256"])
def test_scanned_llama_baselines_factored_match_merged(llama, preset):
    from experiments.harness import presets

    apply_fn, params, ids = llama[0]["scanned"], llama[1], llama[2]
    p = presets.get(preset)
    kwargs = {**p.kwargs, "rank": min(p.kwargs["rank"], 16)}
    from svft_jax import baselines

    adapted = perturb(getattr(baselines, p.method).apply(params, targets=models.LINEN_LLAMA_TARGETS,
                                                         layouts={"layers/.*kernel": "stacked_in_out"}, **kwargs))
    truth = loss_and_grads(lambda a: apply_fn(svft_jax.merge(a), ids), adapted)
    run = wrap(apply_fn, "factored", strict=True)
    assert_same(loss_and_grads(lambda a: run(a, ids), adapted), truth)
    assert set(run.plan(adapted, ids).values()) == {("factored",)}


@pytest.mark.slow  # ≈ 18 s on 2 cores; the suite keeps the remat+auto case above
def test_scanned_and_unrolled_llama_agree_adapted():
    """The same weights and the same M, scanned vs unrolled: the same logits (spectral, strict)."""
    scanned, params = models.linen_llama(**SHAPE, scan=True)
    unrolled, _ = models.linen_llama(**SHAPE, scan=False)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)), jnp.int32)
    plain = models.unstack_layers(params, SHAPE["layers"])
    np.testing.assert_allclose(unrolled(plain, ids), scanned(params, ids), rtol=1e-5, atol=1e-5)
    adapted = _adapt(params, pattern="plain")
    per_layer = svft_jax.apply(plain, pattern="plain", targets=models.LINEN_LLAMA_TARGETS, init="reference",
                               svd_backend="numpy")
    for i in range(SHAPE["layers"]):  # the unrolled nodes get the scanned nodes' trainables, layer by layer
        for k in KERNELS:
            node, stacked = per_layer[f"layers_{i}"][k]["kernel"], adapted["layers"][k]["kernel"]
            values = {f: getattr(stacked, f)[i] for f in node.trainable_fields() if getattr(stacked, f) is not None}
            per_layer[f"layers_{i}"][k]["kernel"] = dataclasses.replace(node, **values)
    want = wrap(scanned, "spectral", strict=True)(adapted, ids)
    np.testing.assert_allclose(wrap(unrolled, "spectral", strict=True)(per_layer, ids), want, rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(want - scanned(params, ids)))) > 1e-3  # M ≠ 0 changes the output
