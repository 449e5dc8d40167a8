"""Typed configuration of the NNX path: patterns, one config per method, and rules.

Shaped as qwix's `LoraRule` and as the typed rules planned for the whole library (issue 19):
every class here is a frozen, `kw_only` dataclass, validated when built, hashable (so equal
configurations share one SVD batch). A method config knows how to build its adapter nodes
through the library's existing verbs (`svft_jax.apply`, `svft_jax.baselines.*.apply`), so the
NNX path adds no second implementation of any method.

    Rule(path=r".*attn.*", method=LoRA(rank=8))                     # first match wins
    Rule(path=None, method=SVFT(pattern=Banded(d=2)))               # None: the default targets
    Rule(path=r"lm_head/w", method=SVFT(), strategy="rebuild")      # a head, by name
    Rule(path=r".*k_proj/w", method=None)                           # leave these out
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from svft_jax._args import check_float_dtype
from svft_jax._paths import compile_regex

# ---- patterns -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pattern:
    """Ω as a registered pattern name and its options (`svft_jax.patterns`).

    Use the named subclasses (`Plain`, `Banded`, `Random`, `TopK`); this base also names a
    pattern added with `svft_jax.register_pattern`: `Pattern(name="mine", k=64)`.
    """

    name: str = "plain"
    d: int | None = None
    k: int | None = None

    def __post_init__(self):
        from svft_jax.patterns import PatternOptions, get_pattern

        get_pattern(self.name).check(PatternOptions(d=self.d, k=self.k))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plain(Pattern):
    """The diagonal of M: r trainable values per target."""

    name: str = dataclasses.field(default="plain", init=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Banded(Pattern):
    """All (i, j) with |i − j| ≤ d (d = 0 is `Plain`)."""

    name: str = dataclasses.field(default="banded", init=False)
    d: int = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class Random(Pattern):
    """k positions drawn with a seeded numpy Generator (`SVFT.seed`); k=None: the d-band's count."""

    name: str = dataclasses.field(default="random", init=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopK(Pattern):
    """The k pairs with the largest |u_iᵀ v_j|; k=None: the d-band's count."""

    name: str = dataclasses.field(default="topk", init=False)


# ---- methods --------------------------------------------------------------------------------


class Method:
    """Base of a method config: `build` returns the adapter nodes of some targets.

    A method config is built once per rule; targets that share an equal config are built in
    one call (one batched SVD for SVFT, one shared random pair for VeRA).
    """

    #: the adapter protocol's method name (`svft_jax.transform.METHODS`).
    method: ClassVar[str] = ""

    def build(self, weights: Mapping[str, Any], layouts: Mapping[str, dict], *, factors=None) -> dict:
        """{path: adapter node} for `weights` ({'/'-joined path: kernel array}), each read with
        the declared `layouts` ({path: {"stack_ndim", "in_axes", "out_axes"}})."""
        raise NotImplementedError


def _exact(paths) -> str:
    return "|".join(re.escape(p) for p in paths)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SVFT(Method):
    """SVFT (Lingam et al., NeurIPS 2024): W = W0 + U M Vᵀ, M sparse on `pattern`.

    Attributes:
      pattern: a `Pattern` (default `Plain()`).
      rank: singular triplets kept (None: min(d1, d2)).
      seed: seeds the random pattern and init="reference".
      init: "zeros" (M = 0) or "reference" (the authors' m · sigmoid(gate)).
      factor_dtype: dtype of the stored U, s, V (M is float32).
      keep_base: use the model's own W0 (True) or U Σ Vᵀ in its place (full rank only).
      svd_backend, svd_dtype: as in `svft_jax.apply`.
    """

    method: ClassVar[str] = "svft"

    pattern: Pattern = dataclasses.field(default_factory=Plain)
    rank: int | None = None
    seed: int = 0
    init: str = "zeros"
    factor_dtype: str = "float32"
    keep_base: bool = True
    svd_backend: str = "auto"
    svd_dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"SVFT(pattern=...) takes a Pattern (Plain(), Banded(d=2), Random(k=...), TopK(k=...)), got {self.pattern!r}.")
        object.__setattr__(self, "factor_dtype", check_float_dtype(self.factor_dtype, "factor_dtype").name)

    def build(self, weights, layouts, *, factors=None):
        import svft_jax

        adapted = svft_jax.apply(
            dict(weights), self.pattern.name, d=self.pattern.d, k=self.pattern.k, rank=self.rank,
            targets=_exact(weights), overrides={re.escape(p): {"layout": layouts[p]} for p in weights},
            seed=self.seed, init=self.init, factor_dtype=self.factor_dtype, keep_base=self.keep_base,
            svd_backend=self.svd_backend, svd_dtype=self.svd_dtype, factors=factors)
        return dict(adapted)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA(Method):
    """LoRA (Hu et al., 2022): W = W0 + (α / r) B A (`svft_jax.baselines.lora`)."""

    method: ClassVar[str] = "lora"

    rank: int = 8
    alpha: float = 16.0
    seed: int = 0
    use_rslora: bool = False

    def build(self, weights, layouts, *, factors=None):
        from svft_jax.baselines import lora

        return dict(lora.apply(dict(weights), self.rank, self.alpha, targets=_exact(weights), layouts=_escaped(layouts),
                               seed=self.seed, use_rslora=self.use_rslora))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoRA(Method):
    """DoRA (Liu et al., 2024): W = m ⊙ (W0 + s B A) / ‖W0 + s B A‖ (`svft_jax.baselines.dora`)."""

    method: ClassVar[str] = "dora"

    rank: int = 8
    alpha: float | None = None
    seed: int = 0
    detach_norm: bool = True
    use_rslora: bool = False

    def build(self, weights, layouts, *, factors=None):
        from svft_jax.baselines import dora

        return dict(dora.apply(dict(weights), self.rank, self.alpha, targets=_exact(weights), layouts=_escaped(layouts),
                               seed=self.seed, detach_norm=self.detach_norm, use_rslora=self.use_rslora))


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeRA(Method):
    """VeRA (Kopiczko et al., 2024): W = W0 + Λ_b B Λ_d A (`svft_jax.baselines.vera`)."""

    method: ClassVar[str] = "vera"

    rank: int = 256
    d_initial: float = 0.1
    seed: int = 0

    def build(self, weights, layouts, *, factors=None):
        from svft_jax.baselines import vera

        return dict(vera.apply(dict(weights), self.rank, d_initial=self.d_initial, targets=_exact(weights),
                               layouts=_escaped(layouts), seed=self.seed))


def _escaped(layouts: Mapping[str, dict]) -> dict:
    return {re.escape(p): layout for p, layout in layouts.items()}


# ---- rules ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Which weights get which method, first match wins (as qwix's rules).

    Attributes:
      path: regex matched in full against a weight's '/'-joined path in the model (e.g.
        'layers/0/attn/q_proj/w', 'mlp/kernel'); None: the default targets — every ≥ 2-D float
        weight that feeds a matmul, outside embeddings, norms and output heads. An explicit
        regex may also pick a head.
      method: a method config (`SVFT(...)`, `LoRA(...)`, `DoRA(...)`, `VeRA(...)`), or None to
        leave the matched weights out.
      layout: optional check, not a declaration: the (stack, in, out) axes a weight's matmul
        must have, as {"stack_ndim", "in_axes", "out_axes"}; a weight whose op contracts other
        axes is refused. Layouts always come from the op.
      strategy: how the adapted op runs ("auto": the cost model's pick per call among rebuild,
        factored and spectral; or any registered strategy, `svft_jax.strategies`).
    """

    path: str | None = None
    method: Method | None
    layout: Mapping[str, Any] | None = None
    strategy: str = "auto"

    def __post_init__(self):
        from svft_jax.strategies import get_strategy

        compile_regex(self.path, "Rule.path")
        if self.method is not None and not isinstance(self.method, Method):
            raise TypeError(f"Rule.method must be a method config (SVFT(...), LoRA(...), DoRA(...), VeRA(...)) or None, got {self.method!r}.")
        get_strategy(self.strategy)
        if self.layout is not None:
            if not isinstance(self.layout, Mapping) or set(self.layout) != {"stack_ndim", "in_axes", "out_axes"}:
                raise ValueError(f"Rule.layout must be a dict with keys stack_ndim, in_axes, out_axes; got {self.layout!r}.")
            object.__setattr__(self, "layout", _FrozenLayout(int(self.layout["stack_ndim"]), tuple(self.layout["in_axes"]),
                                                            tuple(self.layout["out_axes"])))

    @property
    def regex(self) -> re.Pattern | None:
        return compile_regex(self.path, "Rule.path")

    def describe(self) -> str:
        method = "leave out" if self.method is None else repr(self.method)
        return f"Rule(path={self.path!r}, method={method})"


@dataclasses.dataclass(frozen=True)
class _FrozenLayout(Mapping):
    """A layout check as a hashable mapping (so a Rule stays hashable)."""

    stack_ndim: int
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]

    def __getitem__(self, key):
        return getattr(self, key)

    def __iter__(self):
        return iter(("stack_ndim", "in_axes", "out_axes"))

    def __len__(self):
        return 3


def as_rules(rules) -> tuple[Rule, ...]:
    """`rules` as a tuple of `Rule`s: one method config means that method on the default targets."""
    if isinstance(rules, Method):
        return (Rule(method=rules),)
    if isinstance(rules, Rule):
        return (rules,)
    if isinstance(rules, Sequence) and not isinstance(rules, str) and rules and all(isinstance(r, Rule) for r in rules):
        return tuple(rules)
    raise TypeError(f"`rules` must be a method config (e.g. SVFT(pattern=Banded(d=2))), a Rule, or a non-empty list of Rules; got {rules!r}.")
