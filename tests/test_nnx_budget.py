"""`SVFT(budget=N)`: the trainable budget as a field of SVFT's typed config, on a parameter pytree
(`svft_jax.adapt`, `svft_jax.size`) and on an NNX model (`svft_jax.nnx.adapt`, `svft_jax.nnx.size`).

Truths (independent of the solver):
  * the banded choice is the largest d whose total fits: Σ layers · banded_count(r, d) over the
    targets' ranks (written here from the shapes) is ≤ N at the chosen d and > N at d + 1;
  * random: k = ⌊K·r/r_max⌋ per target with Σ k ≤ N < Σ k at K + 1;
  * the config spelling and the keyword spelling (`apply(budget=)`) choose the same d and build
    the same counts; the built nodes hold that d and `count_parameters` counts it;
  * refusals name the fix: d set together with a budget, `Banded()` with no d and no budget, a
    float fraction in the config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import svft_jax
import svft_jax.nnx as snnx
from svft_jax.patterns import banded_count

SVD = dict(svd_backend="numpy")
# name -> kernel shape (in, out); ranks min(in, out): 16, 24, 12; "stack" has 3 layers of rank 10
SHAPES = {"up": (16, 40), "mid": (40, 24), "down": (24, 12)}
STACK = (3, 10, 14)
RANKS_LAYERS = [(16, 1), (24, 1), (12, 1), (10, 3)]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    params = {name: {"kernel": jnp.asarray(rng.standard_normal(shape), jnp.float32)} for name, shape in SHAPES.items()}
    params["stack"] = {"kernel": jnp.asarray(rng.standard_normal(STACK), jnp.float32)}
    return params


STACKED = {"stack/kernel": {"layout": "stacked_in_out"}}  # apply's keyword spelling of the layout


def _rules(config):
    """`config` on every target, the stacked kernel's layout declared (one config, two rules)."""
    return [svft_jax.Rule(path="stack/kernel", method=config, layout="stacked_in_out"), svft_jax.Rule(path=".*", method=config)]


def _banded_total(d, ranks_layers=RANKS_LAYERS):
    return sum(layers * banded_count(r, d) for r, layers in ranks_layers)


def _nodes(tree):
    return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=svft_jax.is_node) if svft_jax.is_node(x)]


@pytest.mark.parametrize("d", [1, 3])
def test_config_budget_picks_the_largest_d_that_fits_as_apply_does(d):
    params = _params()
    budget = _banded_total(d) + 5  # d fits, d + 1 does not
    assert _banded_total(d + 1) > budget
    config = svft_jax.SVFT(pattern=svft_jax.Banded(), budget=budget, **SVD)
    report = svft_jax.size(params, _rules(config))
    keyword = svft_jax.plan(params, "banded", budget=budget, overrides=STACKED, **SVD)
    assert report.choice["d"] == keyword.choice["d"] == d
    assert report.totals["trainable"] == keyword.totals["trainable"] == _banded_total(d) <= budget
    adapted = svft_jax.adapt(params, _rules(config))
    assert {node.meta.d for node in _nodes(adapted)} == {d}
    assert svft_jax.count_parameters(adapted)["trainable"] == _banded_total(d)
    by_apply = svft_jax.apply(params, "banded", budget=budget, overrides=STACKED, **SVD)
    for a, b in zip(_nodes(adapted), _nodes(by_apply), strict=True):
        assert a.meta == b.meta


def test_config_budget_random_gives_k_proportional_to_rank():
    params = _params()
    budget = 500
    report = svft_jax.size(params, _rules(svft_jax.SVFT(pattern=svft_jax.Random(), budget=budget)))
    big_k = report.choice["k_at_max_rank"]
    assert report.choice == svft_jax.plan(params, "random", budget=budget, overrides=STACKED).choice

    def total(kk):
        return sum(layers * min(max(kk * r // 24, 1), r * r) for r, layers in RANKS_LAYERS)

    assert total(big_k) == report.totals["trainable"] <= budget < total(big_k + 1)
    assert {p.path: p.k for p in report.plans}["down/kernel"] == big_k * 12 // 24


def test_config_budget_is_per_config_in_rules():
    """Each config's budget covers the targets it adapts; another rule's targets are apart."""
    params = _params()
    rules = [svft_jax.Rule(path="up/kernel", method=svft_jax.SVFT(pattern=svft_jax.Banded(d=2))),
             *_rules(svft_jax.SVFT(pattern=svft_jax.Banded(), budget=_banded_total(2, RANKS_LAYERS[1:])))]
    plans = {p.path: p for p in svft_jax.size(params, rules).plans}
    assert plans["up/kernel"].d == 2 and {plans[p].d for p in ("mid/kernel", "down/kernel", "stack/kernel")} == {2}


def test_keyword_budget_with_an_override_of_rank_shares_one_d_with_the_rest():
    """An override that changes a budgeted target's rank makes two configs share the budget."""
    params = _params()
    ranks_layers = [(8, 1), *RANKS_LAYERS[1:]]
    budget = _banded_total(2, ranks_layers) + 1
    report = svft_jax.plan(params, "banded", budget=budget, overrides={**STACKED, "up/kernel": {"rank": 8}})
    assert report.choice["d"] == 2 and report.totals["trainable"] == _banded_total(2, ranks_layers)
    assert _banded_total(3, ranks_layers) > budget
    assert {p.path: p.rank for p in report.plans}["up/kernel"] == 8


def test_budget_config_refusals_name_the_fix():
    with pytest.raises(ValueError, match=r"Banded\(d=2\).*budget=N"):
        svft_jax.SVFT(pattern=svft_jax.Banded())
    with pytest.raises(ValueError, match="drop d=2"):
        svft_jax.SVFT(pattern=svft_jax.Banded(d=2), budget=100)
    with pytest.raises(ValueError, match="pattern='plain' has no size"):
        svft_jax.SVFT(budget=100)
    with pytest.raises(TypeError, match=r"fraction.*apply\(budget="):
        svft_jax.SVFT(pattern=svft_jax.Banded(), budget=0.01)
    with pytest.raises(ValueError, match="positive"):
        svft_jax.SVFT(pattern=svft_jax.Banded(), budget=0)
    with pytest.raises(ValueError, match="smallest banded pattern"):
        svft_jax.size(_params(), _rules(svft_jax.SVFT(pattern=svft_jax.Banded(), budget=10)))


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(16, 40, rngs=rngs)
        self.mid = nnx.Linear(40, 24, rngs=rngs)
        self.down = nnx.Linear(24, 12, rngs=rngs)
        self.head = nnx.Linear(12, 3, rngs=rngs)  # left out by the default targets

    def __call__(self, x):
        return self.head(jnp.tanh(self.down(jnp.tanh(self.mid(jnp.tanh(self.up(x)))))))


@pytest.mark.parametrize("d", [0, 2])
def test_nnx_budget_picks_the_same_d_as_apply_on_its_parameters(d):
    base = MLP(nnx.Rngs(0))
    x = jnp.ones((2, 16))
    ranks_layers = RANKS_LAYERS[:3]
    budget = _banded_total(d, ranks_layers) + 3
    assert _banded_total(d + 1, ranks_layers) > budget
    config = snnx.SVFT(pattern=snnx.Banded(), budget=budget, **SVD)
    report = snnx.size(base, config, x)
    model = snnx.adapt(base, config, x)
    assert report.choice["d"] == d and report.totals["trainable"] == _banded_total(d, ranks_layers)
    nodes = _nodes(snnx.to_tree(model))
    assert len(nodes) == 3 and {node.meta.d for node in nodes} == {d}
    assert sum(t.trainable for t in snnx.report(model).targets) == _banded_total(d, ranks_layers)
    keyword = svft_jax.plan(snnx.params(base), "banded", budget=budget, targets="(up|mid|down)/kernel")
    assert keyword.choice["d"] == d
