"""Bad input fails fast and clearly: ValueError (TypeError for a wrong type) whose message
names the parameter path where there is one and says what to do, raised before any SVD runs.
"""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import svft_jax
from svft_jax.baselines import dora, lora, vera
from svft_jax.transform import _factorize as factorize_module

QUERY = "encoder/query/kernel"


def _params(weight=None):
    rng = np.random.default_rng(0)
    return {
        "encoder": {
            "query": {"kernel": jnp.asarray(rng.normal(size=(6, 4)) if weight is None else weight, jnp.float32),
                      "bias": jnp.zeros(4)},
            "norm": {"scale": jnp.ones(4)},
        },
        "lookup": {"kernel": jnp.arange(16, dtype=jnp.int32).reshape(4, 4)},
    }


@pytest.fixture
def no_svd(monkeypatch):
    """Make every SVD entry point fail loudly, so a test proves validation ran first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("an SVD ran before the bad input was reported")

    monkeypatch.setattr(factorize_module, "factorize", forbidden)
    monkeypatch.setattr(factorize_module, "svd_factors", forbidden)
    monkeypatch.setattr(np.linalg, "svd", forbidden)
    monkeypatch.setattr(jnp.linalg, "svd", forbidden)


def _nan_weight():
    weight = np.random.default_rng(0).normal(size=(6, 4))
    weight[2, 1] = np.nan
    return weight


def _inf_weight():
    weight = np.random.default_rng(0).normal(size=(6, 4))
    weight[0, 3] = -np.inf
    return weight


# (id, call, exception type, substrings the message must contain: what and where, and the fix)
CASES = [
    ("unknown-pattern", lambda: svft_jax.apply(_params(), "lora"), ValueError, ["'lora'", "choose one of", "banded"]),
    ("pattern-not-a-string", lambda: svft_jax.apply(_params(), 3), TypeError, ["pattern"]),
    ("unknown-pattern-in-override",
     lambda: svft_jax.apply(_params(), overrides={".*query.*": {"pattern": "diag"}}), ValueError, [QUERY, "'diag'", "choose one of"]),
    ("negative-d", lambda: svft_jax.apply(_params(), "banded", d=-1), ValueError, [QUERY, "`d`", ">= 0"]),
    ("non-int-d", lambda: svft_jax.apply(_params(), "banded", d=1.5), TypeError, [QUERY, "`d`", "int"]),
    ("banded-without-d", lambda: svft_jax.apply(_params(), "banded"), ValueError, [QUERY, "`d`"]),
    ("banded-with-k", lambda: svft_jax.apply(_params(), "banded", d=1, k=4), ValueError, [QUERY, "not `k`"]),
    ("k-zero", lambda: svft_jax.apply(_params(), "random", k=0), ValueError, [QUERY, "`k`", "positive"]),
    ("k-negative", lambda: svft_jax.apply(_params(), "topk", k=-3), ValueError, [QUERY, "`k`", "positive"]),
    ("k-above-r-squared", lambda: svft_jax.apply(_params(), "topk", k=17), ValueError, [QUERY, "k=17", "k ≤ 16"]),
    ("k-not-int", lambda: svft_jax.apply(_params(), "random", k=2.5), TypeError, [QUERY, "`k`", "int"]),
    ("count-pattern-without-k-or-d", lambda: svft_jax.apply(_params(), "random"), ValueError, [QUERY, "`k`", "`d`"]),
    ("rank-zero", lambda: svft_jax.apply(_params(), rank=0), ValueError, [QUERY, "rank=0", "[1, 4]"]),
    ("rank-above-r", lambda: svft_jax.apply(_params(), rank=5), ValueError, [QUERY, "rank=5", "[1, 4]"]),
    ("rank-float", lambda: svft_jax.apply(_params(), rank=2.0), TypeError, [QUERY, "`rank`", "int"]),
    ("rank-bool", lambda: svft_jax.apply(_params(), rank=True), TypeError, [QUERY, "`rank`"]),
    ("k-above-reduced-rank-squared", lambda: svft_jax.apply(_params(), "random", k=5, rank=2), ValueError, [QUERY, "k ≤ 4"]),
    ("targets-match-nothing", lambda: svft_jax.apply(_params(), targets=r".*value/kernel"), ValueError, ["'.*value/kernel'", "matched no parameter", QUERY]),
    ("default-targets-match-nothing", lambda: svft_jax.apply({"norm": {"scale": jnp.ones(3)}}), ValueError, ["default targets", "matched no parameter"]),
    ("non-floating-leaf-chosen", lambda: svft_jax.apply(_params(), targets="lookup/kernel"), ValueError, ["'lookup/kernel'", "int32", "exclude"]),
    ("one-d-leaf-chosen", lambda: svft_jax.apply(_params(), targets=r"encoder/query/(kernel|bias)"), ValueError, ["'encoder/query/bias'", "1-D", "Narrow `targets`"]),
    ("nan-weight", lambda: svft_jax.apply(_params(_nan_weight())), ValueError, [QUERY, "NaN or Inf", "fix the checkpoint"]),
    ("inf-weight", lambda: svft_jax.apply(_params(_inf_weight())), ValueError, [QUERY, "NaN or Inf"]),
    ("svd-dtype-bfloat16", lambda: svft_jax.apply(_params(), svd_dtype="bfloat16"), ValueError, ["svd_dtype", "factor_dtype=jnp.bfloat16"]),
    ("svd-backend-unknown", lambda: svft_jax.apply(_params(), svd_backend="torch"), ValueError, ["svd_backend", "'numpy'"]),
    ("factor-dtype-int", lambda: svft_jax.apply(_params(), factor_dtype=jnp.int8), ValueError, ["factor_dtype", "floating"]),
    ("init-unknown", lambda: svft_jax.apply(_params(), init="kaiming"), ValueError, [QUERY, "`init`", "'reference'"]),
    ("seed-negative", lambda: svft_jax.apply(_params(), "random", k=3, seed=-1), ValueError, ["`seed`", ">= 0"]),
    ("seed-override-not-int", lambda: svft_jax.apply(_params(), "random", k=3, overrides={".*": {"seed": "7"}}), TypeError, [QUERY, "`seed`", "int"]),
    ("seed-override-negative", lambda: svft_jax.apply(_params(), "random", k=3, overrides={".*": {"seed": -2}}), ValueError, [QUERY, "`seed`", ">= 0"]),
    ("invalid-targets-regex", lambda: svft_jax.apply(_params(), targets="encoder/(query"), ValueError, ["`targets`", "not a valid regular expression"]),
    ("invalid-exclude-regex", lambda: svft_jax.apply(_params(), exclude="[a-"), ValueError, ["`exclude`", "not a valid regular expression"]),
    ("invalid-override-regex", lambda: svft_jax.apply(_params(), overrides={"*kernel": {"d": 1}}), ValueError, ["'*kernel'", "not a valid regular expression"]),
    ("targets-not-a-string", lambda: svft_jax.apply(_params(), targets=["encoder/query/kernel"]), TypeError, ["`targets`", "regex string"]),
    ("unknown-override-key", lambda: svft_jax.apply(_params(), overrides={".*": {"lr": 1e-3}}), ValueError, ["['lr']", "allowed"]),
    ("override-not-a-dict", lambda: svft_jax.apply(_params(), overrides={".*": "banded"}), TypeError, ["overrides['.*']", "dict"]),
    ("keep-base-false-with-reduced-rank", lambda: svft_jax.apply(_params(), rank=2, keep_base=False), ValueError, [QUERY, "keep_base=False", "full rank"]),
    ("unknown-layout-name", lambda: svft_jax.apply(_params(), overrides={".*": {"layout": "nhwc"}}), ValueError, [QUERY, "'nhwc'", "out_in"]),
    ("layout-dict-missing-axes", lambda: svft_jax.apply(_params(), overrides={".*": {"layout": {"in_axes": (0,)}}}), ValueError, [QUERY, "'out_axes'"]),
    ("layout-axes-overlap", lambda: svft_jax.apply(_params(), overrides={".*": {"layout": {"in_axes": (0,), "out_axes": (0,)}}}), ValueError, [QUERY, "exactly once"]),
    ("layout-not-a-dict", lambda: svft_jax.apply(_params(), overrides={".*": {"layout": (1, 0)}}), ValueError, [QUERY, "layout must be one of"]),
    # Options and rules that do not apply are refused, not dropped (issue 9, item 5).
    ("plain-with-d", lambda: svft_jax.apply(_params(), d=2), ValueError, ["'plain'", "`d`", "banded"]),
    ("plain-with-k", lambda: svft_jax.apply(_params(), k=3), ValueError, ["'plain'", "`k`", "'random'"]),
    ("random-with-d-and-k", lambda: svft_jax.apply(_params(), "random", d=1, k=3), ValueError, ["not both", "d=1", "k=3"]),
    ("topk-with-d-and-k", lambda: svft_jax.apply(_params(), "topk", d=1, k=3), ValueError, ["not both"]),
    ("override-matches-nothing", lambda: svft_jax.apply(_params(), overrides={".*value/kernel": {"rank": 2}}), ValueError, ["'.*value/kernel'", "matches none", QUERY]),
    ("exclude-matches-nothing", lambda: svft_jax.apply(_params(), exclude=".*valu/kernel"), ValueError, ["exclude=", "matches no parameter"]),
    ("extra-matches-nothing", lambda: svft_jax.apply(_params(), extra="classifer/.*"), ValueError, ["extra='classifer/.*'", "matches no parameter"]),
    ("extra-matches-only-targets", lambda: svft_jax.apply(_params(), extra=QUERY), ValueError, ["matches only adapted kernels", QUERY]),
    ("override-pattern-inherits-k", lambda: svft_jax.apply(_params(), "topk", k=3, overrides={".*": {"pattern": "banded", "d": 1}}), ValueError, ["inherit", "k=3", "explicitly"]),
    ("override-pattern-inherits-d", lambda: svft_jax.apply(_params(), "banded", d=1, overrides={".*": {"pattern": "plain"}}), ValueError, ["inherit", "d=1"]),
    # Path collisions (item 6): a key with '/' would stand for a nested key.
    ("path-collision", lambda: svft_jax.apply({"a/b": {"kernel": jnp.ones((3, 3))}, "a": {"b": {"kernel": jnp.ones((3, 3))}}}), ValueError, ["'a/b/kernel'", "share the path", "rename"]),
    # Non-finite settings (item 7).
    ("lora-alpha-nan", lambda: lora.apply(_params(), alpha=float("nan")), ValueError, ["`alpha`", "finite"]),
    ("lora-alpha-inf", lambda: lora.apply(_params(), alpha=float("inf")), ValueError, ["`alpha`", "finite"]),
    ("dora-alpha-nan", lambda: dora.apply(_params(), alpha=float("nan")), ValueError, ["`alpha`", "finite"]),
    ("vera-d-initial-nan", lambda: vera.apply(_params(), d_initial=float("nan")), ValueError, ["`d_initial`", "finite"]),
    ("baseline-layouts-match-nothing", lambda: lora.apply(_params(), layouts={".*c_attn/kernel": "out_in"}), ValueError, ["'.*c_attn/kernel'", "matches none"]),
    # Mistakes a newcomer makes (item 10).
    ("model-object-instead-of-params", lambda: svft_jax.apply(_FakeModel()), TypeError, ["model.params", "_FakeModel"]),
    ("string-instead-of-params", lambda: svft_jax.apply("banded"), TypeError, ["parameter pytree", "'banded'"]),
]


class _FakeModel:
    """Looks like a Hugging Face Flax model: has .params and .config."""

    params = {"encoder": {"query": {"kernel": jnp.ones((4, 4))}}}
    config = None


@pytest.mark.parametrize(("call", "error", "fragments"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_raises_before_any_svd_with_path_and_fix(no_svd, call, error, fragments):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_applying_twice_is_refused_before_any_svd(monkeypatch):
    adapted = svft_jax.apply(_params(), svd_backend="numpy")
    monkeypatch.setattr(factorize_module, "factorize", lambda *a, **k: pytest.fail("SVD ran"))
    with pytest.raises(ValueError) as info:
        svft_jax.apply(adapted)
    assert QUERY in str(info.value) and "already an adapter node" in str(info.value)
    assert "`merge` first" in str(info.value)


def test_nan_outside_the_targets_is_not_an_error():
    params = _params()
    params["encoder"]["norm"]["scale"] = jnp.array([1.0, np.nan, 1.0, 1.0])
    adapted = svft_jax.apply(params, svd_backend="numpy")
    assert svft_jax.is_node(adapted["encoder"]["query"]["kernel"])


def test_a_bad_target_among_good_ones_fails_before_the_good_ones_are_factorized(no_svd):
    params = _params()
    params["encoder"]["value"] = {"kernel": jnp.asarray(_nan_weight(), jnp.float32)}
    with pytest.raises(ValueError, match="encoder/value/kernel"):
        svft_jax.apply(params)


def test_input_params_are_not_modified_by_a_failed_apply(no_svd):
    params = _params()
    before = np.asarray(params["encoder"]["query"]["kernel"]).copy()
    with pytest.raises(ValueError):
        svft_jax.apply(params, "topk", k=999)
    assert not svft_jax.is_node(params["encoder"]["query"]["kernel"])
    np.testing.assert_array_equal(np.asarray(params["encoder"]["query"]["kernel"]), before)


# --- combine ---------------------------------------------------------------------------------

def _halves(**kwargs):
    return svft_jax.split(svft_jax.apply(_params(), svd_backend="numpy", **kwargs))


def test_combine_rejects_halves_with_different_metadata():
    train_d1, _ = _halves(pattern="banded", d=1)
    _, frozen_d2 = _halves(pattern="banded", d=0)
    with pytest.raises(ValueError, match="same `split`"):
        svft_jax.combine(train_d1, frozen_d2)


def test_combine_rejects_halves_with_different_structure():
    trainable, frozen = _halves()
    frozen = {**frozen, "extra_layer": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match="same `split`") as info:
        svft_jax.combine(trainable, frozen)
    assert "extra_layer/kernel" in str(info.value) and len(str(info.value)) < 400  # one line, not two treedefs


def test_combine_rejects_a_leaf_present_in_both_halves():
    adapted = svft_jax.apply(_params(), svd_backend="numpy")
    with pytest.raises(ValueError, match="present in both"):
        svft_jax.combine(adapted, adapted)


def test_combine_rejects_halves_split_with_different_extra():
    trainable, _ = _halves()
    _, frozen = svft_jax.split(svft_jax.apply(_params(), svd_backend="numpy"), extra=r".*bias")
    with pytest.raises(ValueError, match="missing from both"):  # the bias would vanish
        svft_jax.combine(trainable, frozen)


# --- wrong-half and precision mistakes ---------------------------------------------------------

def test_merge_count_and_summary_refuse_a_split_half_with_the_fix():
    trainable, frozen = _halves()
    for half in (trainable, frozen):
        for call in (svft_jax.merge, svft_jax.count_parameters, lambda t: svft_jax.summary(t, print_fn=None)):
            with pytest.raises(ValueError, match="combine") as info:
                call(half)
            assert "half of svft_jax.split" in str(info.value)


def test_bfloat16_factors_without_w0_warn_that_the_base_model_moves():
    with pytest.warns(svft_jax.PrecisionWarning, match="keep_base"):
        adapted = svft_jax.apply(_params(), factor_dtype=jnp.bfloat16, keep_base=False, svd_backend="numpy")
    # The warning is true: W moves by more than float32 rounding at M = 0 ...
    moved = np.abs(np.asarray(svft_jax.merge(adapted)["encoder"]["query"]["kernel"]) - np.asarray(_params()["encoder"]["query"]["kernel"]))
    assert moved.max() > 1e-4
    # ... and with W0 kept (or float32 factors) nothing is said.
    with warnings.catch_warnings():
        warnings.simplefilter("error", svft_jax.PrecisionWarning)
        svft_jax.apply(_params(), factor_dtype=jnp.bfloat16, svd_backend="numpy")
        svft_jax.apply(_params(), keep_base=False, svd_backend="numpy")


def test_count_parameters_counts_a_tied_buffer_once():
    embedding = jnp.ones((10, 4))
    params = {"wte": {"embedding": embedding}, "lm_head": {"kernel": embedding}, "h": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)}}
    counts = svft_jax.count_parameters(svft_jax.apply(params, targets="h/kernel", svd_backend="numpy"))
    assert counts["total"] == 40 + 16  # the tied head is the embedding, not 40 more parameters


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_dora_norms_are_scale_safe(scale):
    """At weight scale 1e20 squares overflow float32 and at 1e-20 they underflow to zero: DoRA's
    row norms are computed scaled, so the model is finite, starts at W0, and is not refused."""
    weight = np.random.default_rng(0).normal(size=(6, 4)) * scale
    params = _params(weight.astype(np.float32))
    adapted = dora.apply(params, rank=2, targets=QUERY)
    node = adapted["encoder"]["query"]["kernel"]
    expected = np.linalg.norm(np.asarray(params["encoder"]["query"]["kernel"], np.float64).T, axis=1)
    np.testing.assert_allclose(np.asarray(node.magnitude, np.float64), expected, rtol=1e-5)
    merged = np.asarray(svft_jax.merge(adapted)["encoder"]["query"]["kernel"], np.float64)
    assert np.all(np.isfinite(merged))
    np.testing.assert_allclose(merged, np.asarray(params["encoder"]["query"]["kernel"], np.float64), rtol=1e-5)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 6)), jnp.float32)
    factored = np.asarray(node.matmul(x), np.float64)
    np.testing.assert_allclose(factored, np.asarray(x, np.float64) @ merged, rtol=1e-4)


def test_merged_exports_refuse_a_split_half(tmp_path):
    from svft_jax.checkpoint import save_merged_safetensors

    trainable, _ = _halves()
    with pytest.raises(ValueError, match="combine"):
        save_merged_safetensors(tmp_path / "model.safetensors", trainable)
    assert not (tmp_path / "model.safetensors").exists()


def test_models_adapt_with_the_params_forgotten_says_so():
    import svft_jax.models as svft_models

    with pytest.raises(TypeError, match=r"second argument is the parameter pytree.*adapt\(model, params, 'banded'\)"):
        svft_models.adapt(_FakeModel(), "banded")


def test_a_layout_in_a_later_override_does_not_apply_when_an_earlier_one_matches():
    """First match wins for every option, the layout included: select_targets and apply agree,
    so the kernel the later entry would declare is not silently a target with no layout."""
    params = {"blocks": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 16)), jnp.float32)}}
    overrides = {".*": {"rank": 2}, "blocks/kernel": {"layout": "stacked_in_out"}}
    with pytest.raises(ValueError, match=r"blocks/kernel.*does not guess"):  # the later layout is not used
        svft_jax.apply(params, overrides=overrides)
    ordered = {"blocks/kernel": {"layout": "stacked_in_out"}, ".*": {"rank": 2}}
    assert svft_jax.apply(params, overrides=ordered)["blocks"]["kernel"].u.shape == (2, 16, 8)
