"""Typed rules are the one input for per-target method options, layouts and strategies: each
string spelling (apply's `overrides`, the baselines' `layouts`, wrap's `overrides`) builds the
same nodes / strategy choice as the rules written out. Truth: the node configs (every recorded
option, Ω digest included) and the strategies `wrap` reports having run."""

import jax.numpy as jnp
import numpy as np
import pytest

import svft_jax
from svft_jax import SVFT, Banded, LoRA, Random, Rule
from svft_jax.baselines import lora


def _params():
    g = np.random.default_rng(7)
    return {"block": {"query": {"kernel": jnp.asarray(g.normal(size=(8, 6)), jnp.float32)},
                      "value": {"kernel": jnp.asarray(g.normal(size=(8, 6)), jnp.float32)},
                      "fused": {"kernel": jnp.asarray(g.normal(size=(6, 8)), jnp.float32)}}}


def _configs(tree):
    return {p: n.config() for p, n in svft_jax.core._targets.flatten_by_path(tree).items() if svft_jax.is_node(n)}


def test_apply_overrides_equal_the_rules_written_out():
    params = _params()
    sugar = svft_jax.apply(params, "banded", d=1, targets=".*kernel", seed=3,
                           overrides={".*value.*": {"pattern": "random", "k": 5, "d": None},
                                      ".*fused.*": {"layout": "out_in", "rank": 4}})
    rules = [Rule(path=".*value.*", method=SVFT(pattern=Random(k=5), seed=3)),
             Rule(path=".*fused.*", method=SVFT(pattern=Banded(d=1), rank=4, seed=3), layout="out_in"),
             Rule(path=".*", method=SVFT(pattern=Banded(d=1), seed=3))]
    typed = svft_jax.adapt(params, rules, targets=".*kernel")
    assert _configs(sugar) == _configs(typed)
    assert _configs(typed)["block/fused/kernel"]["layout"]["in_axes"] == [1]  # the rule's layout was used


def test_baseline_layouts_equal_the_rules_written_out():
    params = _params()
    sugar = lora.apply(params, rank=2, alpha=4.0, targets=".*kernel", layouts={".*fused.*": "out_in"})
    typed = svft_jax.adapt(params, [Rule(path=".*fused.*", method=LoRA(rank=2, alpha=4.0), layout="out_in"),
                                    Rule(path=".*", method=LoRA(rank=2, alpha=4.0))], targets=".*kernel")
    assert _configs(sugar) == _configs(typed)


def test_wrap_overrides_equal_strategy_rules_and_share_the_adapt_rules():
    params = _params()
    rules = [Rule(path=".*query.*", strategy="factored"), Rule(path=".*", method=LoRA(rank=2))]
    adapted = svft_jax.adapt(params, rules, targets=".*(query|value)/kernel")  # strategy-only rules are wrap's

    def model(p, x):
        return x @ p["block"]["query"]["kernel"] + x @ p["block"]["value"]["kernel"]

    x = jnp.ones((3, 8))
    by_rules = svft_jax.wrap(model, "rebuild", rules=rules, strict=True).plan(adapted, x)
    by_sugar = svft_jax.wrap(model, "rebuild", overrides={".*query.*": "factored"}, strict=True).plan(adapted, x)
    assert by_rules == by_sugar == {"block/query/kernel": ("factored",), "block/value/kernel": ("rebuild",)}


def test_first_match_wins_per_target():
    params = _params()
    adapted = svft_jax.adapt(params, [Rule(path=".*query.*", method=LoRA(rank=1)), Rule(path=".*query.*", method=LoRA(rank=3)),
                                      Rule(path=".*", method=LoRA(rank=2))], targets=".*(query|value)/kernel")
    assert adapted["block"]["query"]["kernel"].meta.rank == 1
    assert adapted["block"]["value"]["kernel"].meta.rank == 2


def test_rules_are_validated_when_built():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Rule(path="(", method=LoRA())
    with pytest.raises(TypeError, match="method config"):
        Rule(path=".*", method="lora")
    with pytest.raises(ValueError, match="`rank` must be a positive int"):
        LoRA(rank=0)
    with pytest.raises(TypeError, match="pattern spec"):
        SVFT(pattern=3)
    with pytest.raises(TypeError):
        LoRA(8)  # kw_only: options are named
