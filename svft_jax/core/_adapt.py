"""The generic verbs: `adapt` (replace target kernels by adapter nodes) and `plan_adapt` (the
same plans, no array built — what `size` reports). One flatten of `params`, one selection of
targets, one build per method, one replacement; no method is named here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from svft_jax._paths import path_to_str
from svft_jax.core._protocol import Trainable, is_special
from svft_jax.core._rules import (
    Method,
    Rule,
    as_rules,
    check_all_used,
    first_match,
    keyword_rules,
    plan_function,
)
from svft_jax.core._targets import (
    check_extra,
    check_finite,
    flatten_by_path,
    resolve_target,
    select_targets,
)


@dataclasses.dataclass(frozen=True)
class Planned:
    """The plans `adapt` builds (in target order), grouped by the config that made them, and
    the paths `extra` marks. `choice`: what a method's whole-set option chose (SVFT's budget)."""

    plans: list
    groups: list  # [(Method config, [plans])]
    extra: list
    choice: dict = dataclasses.field(default_factory=dict)

    @property
    def node_cls(self):
        """The one node class of a single-method plan (None for a mix)."""
        classes = {config.node_class for config, _ in self.groups}
        return classes.pop() if len(classes) == 1 else None


def plan_adapt(params, config_or_rules, *, targets: str | None = None, exclude: str | None = None,
               extra: str | None = None, leaves=None) -> Planned:
    """Every target's validated plan, before any array is built (works on
    `jax.ShapeDtypeStruct` trees).

    Args:
      params: the parameter pytree.
      config_or_rules: a method config (every target) or a list of `Rule`s (first match wins).
      targets: regex of the kernels to adapt (None: every 2-D or N-D 'kernel' outside
        embeddings, norms, biases and heads); exclude: regex never adapted.
      extra: regex of leaves trained in full (marked `Trainable` by `adapt`).
      leaves: `flatten_by_path(params)` when the caller has it already.
    Raises:
      ValueError/TypeError naming the path: a rule that matches no target, a target whose
      first matching rule names no method, a kernel that cannot be adapted, bad options.
    """
    rules = as_rules(config_or_rules)
    leaves = flatten_by_path(params) if leaves is None else leaves
    layouts = {}
    for rule in rules:  # select_targets takes the first declared layout per path, like the rules
        layouts.setdefault(".*" if rule.path is None else rule.path, rule.layout)
    chosen = select_targets(params, targets, exclude, layouts=layouts, leaves=leaves)
    # Rules that only pick a strategy are `wrap`'s; adapt reads the ones with a method or layout.
    rules = [r for r in rules if r.method is not None or r.layout is not None]
    check_all_used(rules, chosen)
    by_config: dict[Method, list] = {}
    for path in chosen:
        rule = first_match(rules, path)
        if rule is None or rule.method is None:
            why = "no rule matches it" if rule is None else f"its first matching rule, {rule.where}, names no method"
            raise ValueError(f"parameter {path!r} is a target but {why}; add a rule with method= for it (e.g. a last "
                             "Rule(path='.*', method=...)) or leave it out with exclude=.")
        target = resolve_target(path, leaves[path], rule.layout)
        check_finite(target)
        by_config.setdefault(rule.method, []).append(target)
    groups = [(config, config.plans(found)) for config, found in by_config.items()]
    order = {path: i for i, path in enumerate(chosen)}
    plans = sorted((p for _, ps in groups for p in ps), key=lambda p: order[p.path])
    return Planned(plans, groups, check_extra(leaves, extra, chosen))


def build(params, planned: Planned, *, extra: str | None = None, leaves=None, **build_options):
    """`params` with every planned target replaced by its node (one `build` per config) and
    the `extra` leaves marked `Trainable`."""
    leaves = flatten_by_path(params) if leaves is None else leaves
    for plan in planned.plans:
        if isinstance(leaves[plan.path], jax.ShapeDtypeStruct):
            raise TypeError(f"parameter {plan.path!r} is a jax.ShapeDtypeStruct (a shapes-only tree); `apply` needs the weights. Use `svft_jax.plan` to size a model from shapes.")
    # One build per node class over all its plans, in target order (SVFT batches its SVDs by
    # shape across targets, whichever rule chose them).
    node_of = {plan.path: config.node_class for config, plans in planned.groups for plan in plans}
    by_node: dict[type, list] = {}
    for plan in planned.plans:
        by_node.setdefault(node_of[plan.path], []).append(plan)
    nodes = {}
    for node_cls, plans in by_node.items():
        nodes.update(node_cls.build(plans, leaves, **build_options))
    # One replacement: each target by its node, each `extra` leaf (checked by plan_adapt) marked.
    marked = set(planned.extra) if extra is not None else set()

    def replace(path, leaf):
        name = path_to_str(path)
        return nodes[name] if name in nodes else Trainable(leaf) if name in marked else leaf

    return jax.tree_util.tree_map_with_path(replace, params, is_leaf=is_special)


def adapt(params, config_or_rules: Method | Rule | list[Rule], *, targets: str | None = None,
          exclude: str | None = None, extra: str | None = None, **build_options):
    """Replace target kernels by adapter nodes of any method — the library's one verb.

        adapted = svft_jax.adapt(params, svft_jax.SVFT(pattern=svft_jax.Banded(d=2)), extra="classifier/.*")
        adapted = svft_jax.adapt(params, [svft_jax.Rule(path=".*query.*", method=svft_jax.LoRA(rank=8)),
                                          svft_jax.Rule(path=".*", method=svft_jax.SVFT())])

    Args:
      params: any parameter pytree (Flax linen, NNX state, HF `model.params`).
      config_or_rules: a method config, or `Rule`s (first match wins; see `Rule`).
      targets, exclude: regexes matched in full against '/'-joined paths (None: the default
        targets, every 2-D or N-D 'kernel' outside embeddings, norms, biases and heads).
      extra: regex of leaves trained in full (a new head), marked `Trainable`.
      **build_options: passed to each method's `build` (SVFT: factors, batch, progress, mesh, fsdp).
    Returns:
      `params` with each target leaf replaced by its method's node.
    Raises:
      ValueError/TypeError naming the parameter path, before any array is built.
    """
    leaves = flatten_by_path(params)
    planned = plan_adapt(params, config_or_rules, targets=targets, exclude=exclude, extra=extra, leaves=leaves)
    return build(params, planned, extra=extra, leaves=leaves, **build_options)


def apply_method(params, node_cls, make_plan, *, targets: str | None = None, exclude: str | None = None,
                 layouts: Mapping[str, Any] | None = None, extra: str | None = None):
    """`adapt` for a method without a typed config: `make_plan(target) -> Plan` on every target.

    Kept for methods written before issue 19; a typed config (`svft_jax.core.Method`
    subclass) gets `adapt`, `size` and `plan(method=...)` too.
    """
    return adapt(params, keyword_rules(plan_function(node_cls, make_plan), layouts), targets=targets,
                 exclude=exclude, extra=extra)
