"""Default SVFT targets for `transformers` Flax architectures, and `adapt` to use them.

The paper adapts the attention projections (Q, K, V, O) and the MLP of every transformer
block; embeddings, norms, poolers and output heads stay frozen (a new head is trained in
full with `extra=`). The path of each projection differs per architecture:

  family         block              attention                                  MLP
  bert, roberta  encoder/layer/N    attention/self/{query,key,value},          intermediate/dense,
                                    attention/output/dense                     output/dense
  vit            encoder/layer/N    attention/attention/{query,key,value},     intermediate/dense,
                                    attention/output/dense                     output/dense
  gpt2           h/N                attn/c_attn (fused Q|K|V), attn/c_proj     mlp/c_fc, mlp/c_proj
  llama, gemma   layers/N           self_attn/{q,k,v,o}_proj                   mlp/{gate,up,down}_proj

GPT-2's `FlaxConv1D` stores its kernel as (out, in), the transpose of Flax `Dense`, so its
kernels need `layout="out_in"` (`default_overrides`). Its `c_attn` kernel (3·hidden, hidden)
fuses Q, K and V: SVFT factorises it as ONE matrix, so Q, K and V share singular vectors
and one M; `qv_only` is therefore not available for GPT-2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """Where the adaptable kernels of one architecture live (regex pieces, matched in full).

    Attributes:
      model_type: `config.model_type`.
      block: one transformer block's path, e.g. r"encoder/layer/\\d+".
      attention: module paths (inside a block) of the Q, K, V and output projections.
      query_value: the subset for `qv_only` (None when Q and V are fused with K).
      mlp: module paths (inside a block) of the feed-forward projections.
      layout: kernel layout of every kernel in a block when it is not Flax Dense's (in, out).
    """

    model_type: str
    block: str
    attention: tuple[str, ...]
    query_value: tuple[str, ...] | None
    mlp: tuple[str, ...]
    layout: str | None = None

    def regex(self, modules: tuple[str, ...]) -> str:
        """Kernels of `modules` in any block, under any prefix (bert/, model/, transformer/, ...)."""
        return rf"(?:.*/)?{self.block}/(?:{'|'.join(modules)})/kernel"


_BERT_MLP = ("intermediate/dense", "output/dense")
_LLAMA_ATTENTION = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj")
_LLAMA_MLP = ("mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")

FAMILIES: dict[str, ModelFamily] = {
    family.model_type: family
    for family in (
        ModelFamily(
            "bert", r"encoder/layer/\d+",
            ("attention/self/query", "attention/self/key", "attention/self/value", "attention/output/dense"),
            ("attention/self/query", "attention/self/value"), _BERT_MLP,
        ),
        ModelFamily(
            "roberta", r"encoder/layer/\d+",
            ("attention/self/query", "attention/self/key", "attention/self/value", "attention/output/dense"),
            ("attention/self/query", "attention/self/value"), _BERT_MLP,
        ),
        ModelFamily(
            "vit", r"encoder/layer/\d+",
            ("attention/attention/query", "attention/attention/key", "attention/attention/value", "attention/output/dense"),
            ("attention/attention/query", "attention/attention/value"), _BERT_MLP,
        ),
        ModelFamily("gpt2", r"h/\d+", ("attn/c_attn", "attn/c_proj"), None, ("mlp/c_fc", "mlp/c_proj"), layout="out_in"),
        ModelFamily("llama", r"layers/\d+", _LLAMA_ATTENTION, ("self_attn/q_proj", "self_attn/v_proj"), _LLAMA_MLP),
        ModelFamily("gemma", r"layers/\d+", _LLAMA_ATTENTION, ("self_attn/q_proj", "self_attn/v_proj"), _LLAMA_MLP),
    )
}


def supported_model_types() -> tuple[str, ...]:
    """The `config.model_type` values that have default targets."""
    return tuple(sorted(FAMILIES))


def model_type_of(model_or_config) -> str:
    """`model_type` of a transformers model, a config, or the string itself."""
    if isinstance(model_or_config, str):
        return model_or_config
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise TypeError(
            "expected a transformers Flax model, a PretrainedConfig or a model_type string, "
            f"got {type(model_or_config).__name__}."
        )
    return model_type


def family_of(model_or_config) -> ModelFamily:
    """The `ModelFamily` of a model, config or model_type; ValueError listing the supported ones."""
    model_type = model_type_of(model_or_config)
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"no default SVFT targets for model_type {model_type!r}; supported: "
            f"{', '.join(supported_model_types())}. For another architecture pass targets= to "
            "svft_jax.apply (a regex over '/'-joined parameter paths; svft_jax.select_targets(params, "
            "targets) previews it), or leave targets=None for the generic rule."
        ) from None


def default_targets(model_or_config, *, attention_only: bool = False, qv_only: bool = False) -> str:
    """The `targets` regex for an architecture: attention Q/K/V/O and MLP kernels of every block.

    Never matches embeddings, norms, poolers or heads.

    Args:
      model_or_config: a transformers Flax model, its config, or a `model_type` string
        ("bert", "roberta", "gpt2", "llama", "gemma", "vit").
      attention_only: only the attention projections (Q, K, V, O).
      qv_only: only the query and value projections (not available for GPT-2, whose Q, K, V
        are one fused kernel).

    Returns:
      A regex for `svft_jax.apply(params, targets=...)`, matched in full against
      '/'-joined paths such as 'bert/encoder/layer/0/attention/self/query/kernel'.
    """
    if attention_only and qv_only:
        raise ValueError("default_targets: choose attention_only or qv_only, not both.")
    family = family_of(model_or_config)
    if qv_only:
        if family.query_value is None:
            raise ValueError(
                f"default_targets: {family.model_type} fuses Q, K and V into one kernel "
                f"({family.attention[0]}), so qv_only is not available; use attention_only=True."
            )
        return family.regex(family.query_value)
    return family.regex(family.attention if attention_only else family.attention + family.mlp)


def default_overrides(model_or_config) -> dict[str, dict[str, Any]]:
    """Per-target options an architecture needs: {regex: {"layout": ...}} (GPT-2), else {}.

    GPT-2's `FlaxConv1D` kernels are stored (out, in); `layout="out_in"` makes W the stored
    matrix itself, so U spans the outputs as in the paper (and factored execution is right).
    """
    family = family_of(model_or_config)
    if family.layout is None:
        return {}
    return {rf"(?:.*/)?{family.block}/.*/kernel": {"layout": family.layout}}


def _with_family_layout(family: ModelFamily, overrides: Mapping[str, Mapping[str, Any]] | None) -> dict:
    """User overrides first (they win), each given the family's layout unless it sets one; then the defaults."""
    merged = {}
    for regex, values in (overrides or {}).items():
        values = dict(values) if isinstance(values, Mapping) else values
        if family.layout is not None and isinstance(values, dict):
            values.setdefault("layout", family.layout)
        merged[regex] = values
    for regex, values in default_overrides(family.model_type).items():
        merged.setdefault(regex, values)
    return merged


def family_rules(model_or_config, rules) -> tuple:
    """`rules` (a method config or `Rule`s) with the family's kernel layout in every rule that
    names a method and no layout (GPT-2: "out_in"), as `overrides` get it; others unchanged."""
    from svft_jax.core._rules import as_rules

    family = family_of(model_or_config)
    rules = as_rules(rules)
    if family.layout is None:
        return rules
    return tuple(dataclasses.replace(r, layout=family.layout) if r.method is not None and r.layout is None else r
                 for r in rules)


def adapt(model, params=None, pattern="plain", *, attention_only: bool = False, qv_only: bool = False,
          targets: str | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None, **kwargs):
    """Adapt a transformers Flax model's parameters with the architecture's default targets and
    layouts filled in: `svft_jax.apply` for a pattern name, `svft_jax.adapt` for any method.

        svft_models.adapt(model, params, "banded", d=2)                        # SVFT, keyword spelling
        svft_models.adapt(model, params, svft_jax.LoRA(rank=8, alpha=16))      # any method config
        svft_models.adapt(model, params, [svft_jax.Rule(path=".*attn.*", method=svft_jax.LoRA(rank=8)),
                                          svft_jax.Rule(method=svft_jax.SVFT())])  # typed rules

    Args:
      model: a transformers Flax model (its `config.model_type` picks the family).
      params: the parameter pytree (default `model.params`; required for a model built
        with `_do_init=False`, e.g. by `load_pretrained`).
      pattern: an SVFT pattern name as in `svft_jax.apply`, or a method config / list of
        `svft_jax.Rule`s as in `svft_jax.adapt` (each rule that names a method and no layout
        gets the family's layout, as overrides do).
      attention_only, qv_only: narrow the default targets (see `default_targets`).
      targets: overrides the default targets entirely.
      overrides: per-target options as in `svft_jax.apply` (pattern-name spelling only; rules
        carry their own options); for GPT-2 each one also gets layout="out_in" unless it sets one.
      **kwargs: with a pattern name, everything else `svft_jax.apply` takes (d, k, rank, seed,
        keep_base, ...); with a config or rules, what `svft_jax.adapt` takes (exclude, extra,
        and the build options: factors, batch, progress, mesh, fsdp).

    Returns:
      The adapted pytree.
    """
    from svft_jax.core._adapt import adapt as adapt_tree
    from svft_jax.methods.svft import apply

    if isinstance(params, str):
        raise TypeError(f"adapt(model, params, pattern, ...): the second argument is the parameter pytree, got the string {params!r}; call adapt(model, params, {params!r}) (the params `load_pretrained` returned, or model.params).")
    family = family_of(model)
    if targets is not None and (attention_only or qv_only):
        raise ValueError("adapt: pass either targets= or attention_only/qv_only, not both.")
    if params is None:
        if not getattr(model, "_is_initialized", True):
            raise ValueError("adapt: the model was built with _do_init=False (e.g. by load_pretrained), so pass its params: adapt(model, params, ...).")
        params = model.params
    if targets is None:
        targets = default_targets(family.model_type, attention_only=attention_only, qv_only=qv_only)
    if isinstance(pattern, str):
        return apply(params, pattern, targets=targets, overrides=_with_family_layout(family, overrides), **kwargs)
    if overrides is not None:
        raise ValueError("adapt(model, params, <method config or rules>, overrides=...): per-target options are "
                         "svft_jax.Rule(path=..., method=...)s in the rules list; overrides= belongs to the pattern-name "
                         "spelling (adapt(model, params, 'banded', d=2, overrides=...)).")
    return adapt_tree(params, family_rules(family.model_type, pattern), targets=targets, **kwargs)
