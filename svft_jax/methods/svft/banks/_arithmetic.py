"""Adapter arithmetic on one base: weighted sums of coefficients, Transformer²-style mixing.

Meaning. For adapters k on one base, W_k = W0 + U M_k Vᵀ with the same U, V, so ΔW is linear in
M:  Σ_k w_k ΔW_k = U (Σ_k w_k M_k) Vᵀ.  A weighted combination of adapters is therefore itself an
SVFT adapter, on the union of their Ω, whose coefficients are the weighted sum (zero-filled off
each adapter's own Ω): task arithmetic (Ilharco et al., 2023) done exactly in |∪Ω| numbers.

Transformer² (Sun et al., "Transformer²: Self-adaptive LLMs", ICLR 2025) adapts a weight by
scaling its singular values, W' = U (Σ ⊗ z) Vᵀ, and mixes task vectors z' = Σ_k α_k z_k. A plain
(diagonal) SVFT adapter is such a vector: W0 + U diag(m) Vᵀ = U diag(s ⊙ z) Vᵀ with z = 1 + m / s
(at full rank; with rank < r the residual W0 − U_r Σ_r V_rᵀ stays). Mixing the z's is
m' = Σ_k α_k m_k + (Σ_k α_k − 1) s, which equals the linear combination when Σ α = 1 and otherwise
also rescales the base spectrum (α summing to 0.5 halves it), as Transformer² does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp

from svft_jax.methods.svft._node import SVFTMeta
from svft_jax.methods.svft.banks._node import AdapterSetNode
from svft_jax.methods.svft.banks._set import (
    _bank_of,
    _mapping,
    _nodes,
    _replace_nodes,
    _set_node,
    names,
    weight_vector,
)


def _new_member(x: AdapterSetNode, used: list[int]) -> SVFTMeta:
    """The SVFT meta of a combination of members `used`: theirs when they share Ω, else the union."""
    members = [x.meta.members[i] for i in used]
    if all(m.rows == members[0].rows and m.cols == members[0].cols for m in members):
        return members[0]
    # Different Ω: the union Ω is no registered pattern's, so it is recorded as an explicit index
    # set (gather/segment-sum products, which are exact for any Ω). Such an adapter lives in the
    # set; `save` refuses it (re-create it from its saved parts instead).
    plan = dataclasses.replace(members[0].plan, pattern="random", d=None, k=int(x.meta.num_entries), seed=0)
    return SVFTMeta(plan, x.meta.rows, x.meta.cols, members[0].near_repeated)


def _append(set_tree, name: str, make):
    if not isinstance(name, str) or not name:
        raise TypeError(f"an adapter name must be a non-empty str, got {name!r}.")
    if name in names(set_tree):
        raise ValueError(f"the set already holds an adapter named {name!r}; pick a new name or remove it first.")

    def grow(x):
        member, bank = make(x)  # bank: the new adapter's coefficients on its own Ω
        k = len(x.meta.names)
        banks = [_bank_of(x, i) for i in range(k)]
        weights = jnp.concatenate([x.weights, jnp.zeros((*x.weights.shape[:-1], 1), x.weights.dtype)], axis=-1)
        return _set_node(x, [*x.meta.members, member], [*banks, bank], [*x.meta.names, name], weights)

    return _replace_nodes(set_tree, grow)


def _positions_in(member: SVFTMeta, x: AdapterSetNode):
    r = x.meta.rank
    union = x.meta.rows.array.astype(int) * r + x.meta.cols.array
    own = member.rows.array.astype(int) * r + member.cols.array
    return jnp.searchsorted(jnp.asarray(union), jnp.asarray(own))


def combine(set_tree, weights: Mapping[str, float], name: str):
    """Add adapter `name` = Σ_k w_k (adapter k): M = Σ_k w_k M_k on the union of their Ω.

    Args:
      set_tree: an adapter set.
      weights: {adapter name: weight}; adapters not named get weight 0.
      name: the new adapter's name.
    Returns:
      The set with the combination as a new (inactive) adapter; its ΔW is Σ_k w_k ΔW_k exactly.
    """
    vector = weight_vector(set_tree, _mapping(weights, "combine", "weights"), "combine")
    used = [i for i, w in enumerate(vector) if w != 0] or [0]

    def make(x):
        mixed = jnp.tensordot(jnp.asarray(vector), x.bank, axes=1)  # on the current union Ω
        member = _new_member(x, used)
        return member, mixed[..., _positions_in(member, x)]

    return _append(set_tree, name, make)


def transformer2_mix(set_tree, alphas: Mapping[str, float], name: str):
    """Add adapter `name` mixing plain (diagonal) adapters as Transformer² mixes z-vectors.

    z_k = 1 + m_k / s (W_k = U diag(s ⊙ z_k) Vᵀ), z' = Σ_k α_k z_k, i.e.
    m' = Σ_k α_k m_k + (Σ_k α_k − 1) s. See the module docstring.

    Raises:
      ValueError when a named adapter is not plain on some target.
    """
    vector = weight_vector(set_tree, _mapping(alphas, "transformer2_mix", "alphas"), "transformer2_mix")
    total = float(vector.sum())
    for path, x in _nodes(set_tree, AdapterSetNode, "transformer2_mix").items():
        for i, w in enumerate(vector):
            if w != 0 and x.meta.members[i].plan.pattern != "plain":
                raise ValueError(f"transformer2_mix: adapter {x.meta.names[i]!r} is {x.meta.members[i].plan.pattern!r} on "
                                 f"{path!r}; Transformer² mixing scales singular values, which needs plain (diagonal) adapters. "
                                 "Use svft_jax.adapters.combine for other patterns.")

    def make(x):
        plain = next(i for i, w in enumerate(vector) if w != 0) if vector.any() else 0
        member = x.meta.members[plain]
        coeffs = sum(float(w) * _bank_of(x, i) for i, w in enumerate(vector) if w != 0) if vector.any() else jnp.zeros_like(_bank_of(x, plain))
        coeffs = coeffs + (total - 1.0) * jnp.asarray(x.s, jnp.float32)
        return member, coeffs

    return _append(set_tree, name, make)
