"""Method presets, defined once and used by every task (sentiment, demo, paper tasks, benchmarks).

A preset names one fine-tuning method with its options, its usual learning rate and the
projections the paper adapts with it:

| preset | method | options | LR | paper scope |
|---|---|---|---|---|
| svft_plain | SVFT^P | pattern plain | 1e-2 | query + value |
| svft_banded_d2 | SVFT^B | pattern banded, d=2 | 1e-2 | all six projections |
| svft_random_d2 | SVFT^R | random, k = the d=2 band's budget | 1e-2 | all six |
| svft_topk_d2 | SVFT^T | top-k, k = the d=2 band's budget | 1e-2 | all six |
| lora_r1, lora_r8 | LoRA | rank r, α = 2r | 1e-3 | all six |
| dora_r1 | DoRA | rank 1, α = 2 | 1e-3 | all six |
| vera_r256 | VeRA | rank 256 | 1e-2 | query + value |
| svft_banded_eq_lora_r1 | SVFT^B | banded, d solved so the count ≤ lora_r1's | 1e-2 | all six (lora_r1's) |
| svft_random_eq_vera_r256 | SVFT^R | random, k solved so the count ≤ vera_r256's | 1e-2 | query + value (vera_r256's) |
| full_ft | full fine-tuning | every weight trains | 5e-5 | — |
| head_only | the new head only | nothing adapted | 0 | — |

Learning rates are the usual values at this scale (LoRA/DoRA 1e-3 with α = 2r as in PEFT's
common setting, VeRA 1e-2 as in its paper, SVFT's M 1e-2, full fine-tuning 5e-5); the paper
tasks replace them with their tables' sourced values (`experiments.paper.configs`).

Scope ("targets per method"): the authors' ViT runs adapt query+value for VeRA and SVFT^P
but all six projections (q, k, v, attention output, MLP in and out) for LoRA, DoRA and SVFT^B;
that is what reproduces the paper's parameter counts (LoRA r=8 1.32M, SVFT^B d=2 0.27M on
ViT-B). SVFT^R and SVFT^T, absent from that table, follow SVFT^B (same budget). A task either
honours the scope (`Preset.targets(model_type)`, the ViT task) or adapts the same kernels with
every method (the sentiment task, by design: one protocol for all).

Equal-budget presets (`budget_of`): `svft_<banded|random|topk>_eq_<preset>` trains at most as many
parameters as the named adapter preset on the same targets (its scope). The count is not written
down: `Preset.adapt` computes the reference's trainable count on the targets it is given
(`svft_jax.plan`, shapes only) and hands it to `svft_jax.apply(budget=)`, which solves d (banded)
or k (random/top-k). On SmolLM2-135M: lora_r1 305,280 → banded d=1, 293,340; vera_r256 38,400 →
random k = 960 per q_proj and 320 per v_proj, 38,400 (banded there would be d=0, SVFT^P itself).

Other widths parse too: `svft_<banded|random|topk>_d<N>` and `<lora|dora|vera>_r<N>`
(`get("svft_random_d16")`), with the same rules.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import svft_jax

METHODS = ("svft", "lora", "dora", "vera", "full", "head")
SCOPES = ("all", "query_value")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preset:
    """One fine-tuning method.

    Attributes:
      name: the preset's name ('svft_banded_d2').
      method: 'svft', 'lora', 'dora', 'vera' (an adapter's `apply`), 'full' (every weight
        trains) or 'head' (only the task's new head trains).
      options: keyword arguments of the adapter's `apply`, as sorted (name, value) pairs.
      learning_rate: the usual peak learning rate of the method's trainable weights.
      scope: 'all' or 'query_value': the projections the paper adapts with this method.
      budget_of: (SVFT only) the name of an adapter preset whose trainable count on the same
        targets is this preset's `budget=` (the pattern size is solved, not set); None: none.
    """

    name: str
    method: str
    options: tuple[tuple[str, Any], ...] = ()
    learning_rate: float
    scope: str = "all"
    budget_of: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Preset {self.name!r}: method must be one of {METHODS}, got {self.method!r}.")
        if self.scope not in SCOPES:
            raise ValueError(f"Preset {self.name!r}: scope must be one of {SCOPES}, got {self.scope!r}.")
        if self.budget_of is not None:
            if self.method != "svft" or {"d", "k", "budget"} & set(self.kwargs):
                raise ValueError(f"Preset {self.name!r}: budget_of solves an SVFT pattern's size; it needs method "
                                 f"'svft' without d/k/budget options, got {self.method!r} with {self.kwargs}.")
            if get(self.budget_of).method not in ("svft", "lora", "dora", "vera"):
                raise ValueError(f"Preset {self.name!r}: budget_of must name an adapter preset, got {self.budget_of!r}.")

    @property
    def kwargs(self) -> dict:
        """The adapter's `apply` keyword arguments."""
        return dict(self.options)

    @property
    def full_finetune(self) -> bool:
        """True when every weight trains (the driver's `Task.full_finetune`)."""
        return self.method == "full"

    def targets(self, model_type: str) -> str:
        """The paper's target regex of this method for an architecture ('vit', 'bert', 'llama', ...)."""
        from svft_jax.models import default_targets

        return default_targets(model_type, qv_only=self.scope == "query_value")

    def adapt(self, params, *, targets: str | None = None, seed: int = 0, **overrides):
        """`params` with this method's adapter nodes (full / head: `params` unchanged).

        Args:
          params: the model's parameter pytree.
          targets: regex of adapted kernels (None: the library's default targets).
          seed: pattern / initialisation seed.
          overrides: extra `apply` keywords (e.g. `factor_dtype`, `svd_backend`).
        """
        if self.method in ("full", "head"):
            return params
        if self.budget_of is not None and "budget" not in overrides:
            overrides = {**overrides, "budget": self.reference_count(params, targets=targets)}
        kwargs = {**self.kwargs, **overrides}
        if self.method == "svft":
            return svft_jax.apply(params, targets=targets, seed=seed, **kwargs)
        from svft_jax import baselines

        return getattr(baselines, self.method).apply(params, targets=targets, seed=seed, **kwargs)

    def reference_count(self, params, *, targets: str | None = None) -> int | None:
        """The trainable count of the `budget_of` preset on `targets` (None without one), from
        shapes alone (`svft_jax.plan`): this preset's budget."""
        if self.budget_of is None:
            return None
        reference = get(self.budget_of)
        options = dict(reference.kwargs)
        if reference.method == "svft":
            options["pattern"] = options.get("pattern", "plain")
        return int(svft_jax.plan(params, method=reference.method, targets=targets, **options).totals["trainable"])

    def describe(self) -> dict:
        """A JSON-ready description (what results files record)."""
        described = {"name": self.name, "method": self.method, "options": self.kwargs,
                     "learning_rate": self.learning_rate, "scope": self.scope}
        return described if self.budget_of is None else {**described, "budget_of": self.budget_of}


def _svft(pattern: str, d: int | None) -> Preset:
    options = (("pattern", pattern),) if d is None else (("d", d), ("pattern", pattern))
    name = "svft_plain" if pattern == "plain" else f"svft_{pattern}_d{d}"
    return Preset(name=name, method="svft", options=options, learning_rate=1e-2,
                  scope="query_value" if pattern == "plain" else "all")


def _svft_at_budget_of(pattern: str, reference: str) -> Preset:
    """SVFT with `pattern`, its size solved so the count is ≤ `reference`'s on the reference's scope."""
    return Preset(name=f"svft_{pattern}_eq_{reference}", method="svft", options=(("pattern", pattern),),
                  learning_rate=1e-2, scope=get(reference).scope, budget_of=reference)


def _low_rank(method: str, rank: int) -> Preset:
    if method == "vera":
        return Preset(name=f"vera_r{rank}", method="vera", options=(("rank", rank),), learning_rate=1e-2,
                       scope="query_value")
    return Preset(name=f"{method}_r{rank}", method=method, options=(("alpha", 2.0 * rank), ("rank", rank)),
                  learning_rate=1e-3)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    _svft("plain", None),
    _svft("banded", 2),
    _svft("random", 2),
    _svft("topk", 2),
    _low_rank("lora", 1),
    _low_rank("lora", 8),
    _low_rank("dora", 1),
    _low_rank("vera", 256),
    Preset(name="full_ft", method="full", learning_rate=5e-5),
    Preset(name="head_only", method="head", learning_rate=0.0),
]}

_SVFT_RE = re.compile(r"svft_(banded|random|topk)_d(\d+)")
_LOW_RANK_RE = re.compile(r"(lora|dora|vera)_r([1-9]\d*)")
_EQUAL_BUDGET_RE = re.compile(r"svft_(banded|random|topk)_eq_(\w+)")


def get(name: str) -> Preset:
    """The preset called `name`: one of `PRESETS`, or a parsed width/rank variant.

    Raises:
      ValueError: for an unknown name, listing the presets and the accepted forms.
    """
    if name in PRESETS:
        return PRESETS[name]
    match = _SVFT_RE.fullmatch(name)
    if match:
        return _svft(match.group(1), int(match.group(2)))
    match = _LOW_RANK_RE.fullmatch(name)
    if match:
        return _low_rank(match.group(1), int(match.group(2)))
    match = _EQUAL_BUDGET_RE.fullmatch(name)
    if match:
        return _svft_at_budget_of(match.group(1), match.group(2))
    hint = ""
    if name.startswith("svft_plain_"):
        hint = " ('svft_plain' takes no _d suffix: it is banded d=0)"
    elif re.fullmatch(r"svft_(banded|random|topk)", name):
        hint = f" (pattern {name[5:]!r} needs a width/budget, e.g. '{name}_d2')"
    raise ValueError(
        f"unknown method preset {name!r}{hint}; presets: {', '.join(PRESETS)}; "
        "other widths: svft_<banded|random|topk>_d<N>, <lora|dora|vera>_r<N>; "
        "equal budgets: svft_<banded|random|topk>_eq_<adapter preset>."
    )


# the equal-budget presets of the LLM experiment (defined after `get`: they look up their reference)
PRESETS.update({p.name: p for p in [_svft_at_budget_of("banded", "lora_r1"), _svft_at_budget_of("random", "vera_r256")]})


def get_many(names) -> list[Preset]:
    """`get` for each name, all checked before any is used (a typo fails before any training)."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("no method presets given.")
    return [get(name) for name in names]
