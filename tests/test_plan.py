"""`svft_jax.plan` and `budget=`: sizing an adapter from shapes alone.

Truths:
- plan == apply: on every Hugging Face family (tiny configs, shapes from `_do_init=False`) and
  for every baseline, the plans `plan` returns are the plans of the nodes `apply` builds, the
  arrays it predicts are the nodes' arrays (shape and dtype), and its totals are
  `count_parameters` of the adapted tree.
- No SVD runs in `plan` (the SVD routine is replaced by one that raises).
- The budget's choice is the largest d (or K) whose total fits: checked against counts
  computed independently with `banded_count` / the k formula, one step above overflowing.
- Hand counts: FLOPs per token against the cost model's formulas written out here; the
  paper's parameter counts from shapes (Gemma-2B, ViT-B).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svft_jax
import svft_jax.models as svft_models
from svft_jax.baselines import dora, lora, vera  # noqa: F401  (registers the planners)
from svft_jax.transform import _factorize
from svft_jax.transform._plan import node_arrays
from tests.stack import FLAX_MODELS, needs_flax_models

transformers = pytest.importorskip("transformers")
if FLAX_MODELS:  # the HF families' tiny models (transformers 4 only)
    from test_models_hf import FAMILIES
else:
    FAMILIES = {}

SVD = dict(svd_backend="numpy")


def _family_options(family):
    model_type = family.model_cls.config_class.model_type
    overrides = svft_models.default_overrides(model_type)
    return svft_models.default_targets(model_type), overrides


def _check_plan_matches(report, adapted):
    nodes = {p: x for p, x in svft_jax.transform._targets.flatten_by_path(adapted).items() if svft_jax.is_node(x)}
    assert [p.path for p in report.plans] == list(nodes)
    counts = svft_jax.count_parameters(adapted)
    assert report.totals["trainable"] == counts["trainable"]
    assert report.totals["total"] == counts["total"]
    assert report.totals["targets"] == counts["targets"]
    for plan, row in zip(report.plans, report.rows, strict=True):
        node = nodes[plan.path]
        meta_plan = getattr(node.meta, "plan", node.meta)
        assert meta_plan == plan
        predicted = {name: (spec.shape, spec.dtype) for name, spec in row.arrays.items()}
        assert predicted == node_arrays(node), plan.path
        assert row.trainable == node.num_trainable
        assert row.entries == node.entries_per_layer


@pytest.fixture(scope="module")
def built():
    """{family: (shapes tree, concrete params)} of one-layer tiny models."""
    return {name: (f.shapes(1), f.build(1).params) for name, f in FAMILIES.items()}


@needs_flax_models
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plan_on_shapes_equals_apply_on_every_hf_family(family, built):
    shapes, params = built[family]
    targets, overrides = _family_options(FAMILIES[family])
    options = dict(d=2, targets=targets, overrides=overrides or None, extra=FAMILIES[family].extra)
    report = svft_jax.plan(shapes, "banded", **options, **SVD)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(shapes))
    adapted = svft_jax.apply(params, "banded", **options, **SVD)
    _check_plan_matches(report, adapted)
    concrete = svft_jax.plan(params, "banded", **options, **SVD)
    assert concrete.plans == report.plans and concrete.totals == report.totals


@needs_flax_models
@pytest.mark.parametrize("method, options", [("lora", dict(rank=4)), ("dora", dict(rank=2)), ("vera", dict(rank=16))])
@pytest.mark.parametrize("family", ["gpt2", "llama", "vit"])
def test_plan_equals_apply_for_baselines(family, method, options, built):
    shapes, params = built[family]
    targets, overrides = _family_options(FAMILIES[family])
    layouts = {r: v["layout"] for r, v in overrides.items()} or None
    report = svft_jax.plan(shapes, method=method, targets=targets, layouts=layouts, **options)
    module = {"lora": lora, "dora": dora, "vera": vera}[method]
    adapted = module.apply(params, targets=targets, layouts=layouts, **options)
    _check_plan_matches(report, adapted)
    if method == "vera":  # one shared A, B buffer per target shape, counted once
        shapes_seen = {(row.arrays["shared_a"].shape, row.arrays["shared_b"].shape) for row in report.rows}
        assert report.totals["factor_bytes"] == sum(4 * (math.prod(a) + math.prod(b)) for a, b in shapes_seen)


def _stack(layers=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "q": {"kernel": rng.normal(size=(24, 24)).astype(np.float32)},
        "up": {"kernel": rng.normal(size=(24, 40)).astype(np.float32)},
        "ScanDense_0": {"kernel": rng.normal(size=(layers, 40, 24)).astype(np.float32)},
        "head": {"kernel": rng.normal(size=(24, 5)).astype(np.float32)},
    }


TARGETS = "(q|up|ScanDense_0)/kernel"


@pytest.mark.parametrize("pattern, options", [("plain", {}), ("banded", dict(d=3)), ("random", dict(k=50)),
                                              ("topk", dict(k=30)), ("banded", dict(d=1, rank=8, init="reference")),
                                              ("plain", dict(keep_base=False, factor_dtype=jnp.bfloat16))])
def test_plan_equals_apply_on_every_pattern_and_option(pattern, options):
    params = _stack()
    with pytest.warns() if options.get("keep_base") is False else _nothing():
        report = svft_jax.plan(params, pattern, targets=TARGETS, extra="head/.*", **options, **SVD)
    with pytest.warns() if options.get("keep_base") is False else _nothing():
        adapted = svft_jax.apply(params, pattern, targets=TARGETS, extra="head/.*", **options, **SVD)
    _check_plan_matches(report, adapted)
    assert report.totals["extra"] == 24 * 5


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_plan_runs_no_svd_and_apply_refuses_shapes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("plan must not run an SVD")

    monkeypatch.setattr(_factorize, "svd_factors", refuse)
    monkeypatch.setattr(np.linalg, "svd", refuse)
    shapes = jax.eval_shape(lambda: jax.tree_util.tree_map(jnp.asarray, _stack()))
    report = svft_jax.plan(shapes, "topk", k=20, targets=TARGETS)
    assert report.totals["trainable"] == 20 * (1 + 1 + 3)
    with pytest.raises(TypeError, match="ShapeDtypeStruct.*svft_jax.plan"):
        svft_jax.apply(shapes, "banded", d=1, targets=TARGETS)
    with pytest.raises(TypeError, match="ShapeDtypeStruct"):
        lora.apply(shapes, rank=2, targets=TARGETS)


def test_plan_checks_everything_apply_checks_on_shapes():
    shapes = jax.eval_shape(lambda: jax.tree_util.tree_map(jnp.asarray, _stack()))
    with pytest.raises(ValueError, match="rank=99 is out of range"):
        svft_jax.plan(shapes, "banded", d=1, rank=99, targets=TARGETS)
    with pytest.raises(ValueError, match="extra="):
        svft_jax.plan(shapes, "banded", d=1, targets=TARGETS, extra="nothing/.*")
    with pytest.raises(ValueError, match="pattern='banded' is an SVFT option"):
        svft_jax.plan(shapes, "banded", method="lora", rank=2)
    with pytest.raises(ValueError, match="adapter method"):
        svft_jax.plan(shapes, method="adalora")
    bad = _stack()
    bad["q"]["kernel"][0, 0] = np.nan
    with pytest.raises(ValueError, match="'q/kernel' contains NaN"):
        svft_jax.plan(bad, "plain", targets=TARGETS)


def test_flops_per_token_are_the_cost_models_hand_counts():
    tokens = 256
    report = svft_jax.plan(_stack(), "banded", d=1, targets=TARGETS, tokens=tokens)
    row = {r.path: r for r in report.rows}["ScanDense_0/kernel"]
    d1, d2, r, layers = 24, 40, 24, 3  # scan kernel (3, 40, 24) is (layers, in, out): W is 24×40
    assert row.shape == "3×24×40"
    rebuild = layers * (3 * tokens * d1 * d2 + 2 * d1 * d2 * r) / tokens
    factored = layers * (2 * tokens * d1 * d2 + tokens * r * (3 * d1 + 2 * d2)) / tokens
    assert row.flops_per_token["rebuild"] == pytest.approx(rebuild)
    assert row.flops_per_token["factored"] == pytest.approx(factored)
    assert row.factor_bytes == layers * 4 * (d1 * r + r + d2 * r)
    assert row.base_bytes == layers * 4 * d1 * d2
    assert "ScanDense_0/kernel" in report.table() and "trainable params:" in str(report)


# ---- budget ---------------------------------------------------------------------------------


def _banded_total(ranks_layers, d):
    return sum(layers * svft_jax.banded_count(r, d) for r, layers in ranks_layers)


def test_budget_banded_picks_the_largest_d_that_fits():
    params = _stack()
    ranks_layers = [(24, 1), (24, 1), (24, 3)]
    budget = _banded_total(ranks_layers, 4) + 7  # d=4 fits, d=5 does not
    assert _banded_total(ranks_layers, 5) > budget
    report = svft_jax.plan(params, "banded", budget=budget, targets=TARGETS)
    assert report.choice["d"] == 4 and report.totals["trainable"] == _banded_total(ranks_layers, 4)
    adapted = svft_jax.apply(params, "banded", budget=budget, targets=TARGETS, **SVD)
    assert svft_jax.count_parameters(adapted)["trainable"] == report.totals["trainable"]
    assert {x.meta.d for x in jax.tree_util.tree_leaves(adapted, is_leaf=svft_jax.is_node) if svft_jax.is_node(x)} == {4}


def test_budget_fraction_counts_all_parameters_and_extra_leaves():
    params = _stack()
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    report = svft_jax.plan(params, "banded", budget=0.25, targets=TARGETS, extra="head/.*")
    limit = math.floor(0.25 * total)
    d = report.choice["d"]
    ranks_layers = [(24, 1), (24, 1), (24, 3)]
    assert _banded_total(ranks_layers, d) + 120 <= limit < _banded_total(ranks_layers, d + 1) + 120
    assert report.totals["trainable"] == _banded_total(ranks_layers, d) + 120


def test_budget_random_gives_k_proportional_to_rank():
    params = _stack()
    params["small"] = {"kernel": np.ones((12, 8), np.float32) + np.eye(12, 8, dtype=np.float32)}
    targets = "(q|up|ScanDense_0|small)/kernel"
    budget = 1000
    report = svft_jax.plan(params, "random", budget=budget, targets=targets)
    big_k = report.choice["k_at_max_rank"]

    def total(kk):
        return sum(layers * min(max(kk * r // 24, 1), r * r) for r, layers in [(24, 1), (24, 1), (24, 3), (8, 1)])

    assert total(big_k) <= budget < total(big_k + 1)
    ks = {p.path: p.k for p in report.plans}
    assert ks["small/kernel"] == big_k * 8 // 24 and ks["q/kernel"] == big_k


def test_budget_keeps_overridden_targets_and_refuses_what_it_cannot_do():
    params = _stack()
    report = svft_jax.plan(params, "banded", budget=400, targets=TARGETS, overrides={"q/kernel": {"pattern": "plain", "d": None}})
    plans = {p.path: p for p in report.plans}
    assert plans["q/kernel"].pattern == "plain" and report.totals["trainable"] <= 400
    assert report.totals["trainable"] == 24 + 4 * svft_jax.banded_count(24, report.choice["d"])
    with pytest.raises(ValueError, match="budget.*pattern='plain'"):
        svft_jax.plan(params, "plain", budget=100, targets=TARGETS)
    with pytest.raises(ValueError, match="drop d=2"):
        svft_jax.plan(params, "banded", d=2, budget=100, targets=TARGETS)
    with pytest.raises(ValueError, match="smallest banded pattern"):
        svft_jax.plan(params, "banded", budget=10, targets=TARGETS)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        svft_jax.apply(params, "banded", budget=1.5, targets=TARGETS)
    with pytest.raises(TypeError, match="budget"):
        svft_jax.plan(params, "banded", budget="1%", targets=TARGETS)


# ---- the paper's counts from shapes -----------------------------------------------------------


def test_paper_counts_from_config_shapes():
    from experiments.paper import paper_counts

    gemma = paper_counts.llm_shapes(**paper_counts.CONFIGS["gemma-2b"])
    seven = paper_counts.PROJECTIONS
    assert svft_jax.plan(gemma, "plain", targets=paper_counts.regex(seven)).totals["trainable"] == 193_536
    assert svft_jax.plan(gemma, "banded", d=16, targets=paper_counts.regex(seven)).totals["trainable"] == 6_352_416
    vit = paper_counts.vit_shapes(**paper_counts.CONFIGS["vit-b"])
    qv = paper_counts.regex(paper_counts.QV)
    assert svft_jax.plan(vit, "plain", targets=qv).totals["trainable"] == 18_432
    assert svft_jax.plan(vit, "plain", targets=qv, init="reference").totals["trainable"] == 18_456
    six = paper_counts.regex(paper_counts.VIT_MODULES)
    assert svft_jax.plan(vit, "banded", d=2, targets=six).totals["trainable"] == 276_048
