"""A method is one typed config; configuration is typed rules (as qwix's `LoraRule`).

    svft_jax.adapt(params, SVFT(pattern=Banded(d=2)))                        # one method everywhere
    svft_jax.adapt(params, [Rule(path=".*attn.*", method=LoRA(rank=8, alpha=16)),
                            Rule(path=".*c_fc/kernel", method=SVFT(), layout="out_in"),
                            Rule(path=".*", method=SVFT(pattern=Banded(d=2)))])

`Method`: the base of every method's config — a frozen, `kw_only` dataclass whose fields are
the method's options, validated when a target is planned; `plan(target)` gives that target's
`Plan` (the hashable description its node is built from), `plans(targets)` all of them (a
method whose targets share something, such as VeRA's one random pair, overrides it).

`Rule`: for the targets whose '/'-joined path matches `path` in full, the `method` that adapts
them, the kernel `layout` when the shape cannot tell it, and the execution `strategy` `wrap`
runs them with. The first rule that matches a target is its rule (first match wins, as in qwix);
a rule that matches no target is an error. The string spellings of earlier releases
(`apply(overrides={regex: {...}})`, the baselines' `layouts=`, `wrap(overrides={regex: name})`,
`models.adapt`'s layouts) build these rules.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

from svft_jax._paths import compile_regex, matches


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method(abc.ABC):
    """Base of a method's typed config (e.g. `SVFT(...)`, `LoRA(rank=8, alpha=16)`).

    A subclass sets `node` (its `AdapterNode` class, registered with `adapter_node`) and
    implements `plan(target)`. Everything generic (`adapt`, `size`, merge, split, optimizer,
    wrap, summary, adapter files) then works on it.
    """

    #: the method's node class (its `build` is the one constructor).
    node: ClassVar[type]

    @property
    def name(self) -> str:
        return self.node_class.method

    @property
    def node_class(self) -> type:
        """The node class that `build`s this config's plans."""
        return type(self).node

    @abc.abstractmethod
    def plan(self, target):
        """The validated `Plan` of one `Target` (path, layout, kernel). Raises ValueError/
        TypeError naming the target's path and the fix."""

    def plans(self, targets: Sequence) -> list:
        """Plans of every target this config adapts, in order (default: one by one)."""
        return [self.plan(t) for t in targets]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        node = cls.__dict__.get("node")
        if node is not None:
            node.config_cls = cls  # the node's typed config (its keyword spelling builds it)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """One typed rule: for paths matching `path` (a regex matched in full; None: every default
    target), which `method` adapts the kernel, its `layout` (a name such as "out_in", a dict or
    a `KernelLayout`), and the `strategy` `wrap` runs it with. Fields left None say nothing for
    those paths.

    On a parameter pytree (`adapt`) the rules choose among the targets that `targets=` selects,
    so path=None and path=".*" are the same. On an NNX model (`svft_jax.nnx.adapt`) path=None
    means the default targets (matmul weights outside embeddings, norms and heads) while an
    explicit regex may also pick a head, and `layout` is a check of the layout read from the op.

    `label` names the rule in error messages (the sugar spellings set it, e.g.
    "overrides key '.*q'"); by default the rule's own repr.
    """

    path: str | None = None
    method: Method | None = None
    layout: Any = None
    strategy: str | None = None
    label: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.path is not None and not isinstance(self.path, str):
            raise TypeError(f"Rule(path=...) must be a regex string or None (the default targets), got {type(self.path).__name__}.")
        compile_regex(self.path, self.where)  # a bad regex fails when the rule is built
        if self.method is not None and not isinstance(self.method, Method):
            raise TypeError(f"{self.where}: method= must be a method config such as svft_jax.SVFT(...) or "
                            f"svft_jax.LoRA(rank=8), got {type(self.method).__name__}.")
        if self.strategy is not None and not isinstance(self.strategy, str):
            raise TypeError(f"{self.where}: strategy= must be a registered strategy name, got {self.strategy!r}.")

    @property
    def where(self) -> str:
        return self.label or f"Rule(path={self.path!r})"

    def matches(self, path: str) -> bool:
        """Whether `path` is one of this rule's (None: every target matches)."""
        return self.path is None or matches(compile_regex(self.path, self.where), path)


def as_rules(config_or_rules) -> tuple[Rule, ...]:
    """A method config (every target) or a sequence of `Rule`s, as rules."""
    if isinstance(config_or_rules, Method):
        return (Rule(method=config_or_rules, label=f"{type(config_or_rules).__name__}(...)"),)
    if isinstance(config_or_rules, Rule):
        return (config_or_rules,)
    if isinstance(config_or_rules, Sequence) and not isinstance(config_or_rules, str):
        rules = tuple(config_or_rules)
        bad = [r for r in rules if not isinstance(r, Rule)]
        if not bad:
            return rules
        raise TypeError(f"rules must be svft_jax.Rule objects, got {type(bad[0]).__name__} ({bad[0]!r}).")
    raise TypeError(f"expected a method config (e.g. svft_jax.SVFT(...), svft_jax.LoRA(rank=8)) or a list of "
                    f"svft_jax.Rule, got {type(config_or_rules).__name__}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _PlanFunction(Method):
    """A config made of a node class and a `Target -> Plan` function (`apply_method`)."""

    node_cls: type
    make_plan: Any

    @property
    def node_class(self) -> type:
        return self.node_cls

    def plan(self, target):
        return self.make_plan(target)


def plan_function(node_cls: type, make_plan) -> Method:
    """A method config from a node class and a `Target -> Plan` function."""
    return _PlanFunction(node_cls=node_cls, make_plan=make_plan)


def keyword_rules(config: Method, layouts, *, what: str = "layouts") -> list[Rule]:
    """The keyword spelling `layouts={regex: layout}` as rules: one per entry (in order, each
    with `config`), then every other target with `config`."""
    from collections.abc import Mapping

    if layouts is not None and not isinstance(layouts, Mapping):
        raise TypeError(f"`{what}` must be a mapping {{regex: layout}}, got {type(layouts).__name__}.")
    rules = [Rule(path=r, method=config, layout=v, label=f"{what} key {r!r}") for r, v in (layouts or {}).items()]
    return [*rules, Rule(path=".*", method=config)]


def first_match(rules: Sequence[Rule], path: str) -> Rule | None:
    """The first rule whose regex matches `path` in full (None: no rule does)."""
    return next((r for r in rules if r.matches(path)), None)


def check_all_used(rules: Sequence[Rule], paths: Sequence[str], *, field: str | None = None) -> None:
    """Raise for the first rule (that sets `field`, if given) matching none of `paths`."""
    for rule in rules:
        if field is not None and getattr(rule, field) is None:
            continue
        if not any(rule.matches(p) for p in paths):
            raise ValueError(f"{rule.where} matches none of the {len(paths)} targets (e.g. {list(paths)[:3]}); "
                             "fix the regex or drop it.")
