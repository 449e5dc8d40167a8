"""The FLOP cost model that `strategy="auto"` uses to pick rebuild, factored or spectral per
target and call.

Counts multiply-adds of one training step (forward + backward) for one target W: d1 × d2
applied to T tokens, where the adapter's update has rank r (SVFT: r singular triplets;
LoRA: its rank) and M has |Ω| entries. Only W0 and the adapter's factors are frozen; the
input x needs a gradient.

rebuild (merge once per step, then a dense layer):
    build W = W0 + (U M) Vᵀ            d1·d2·r
    forward y = x Wᵀ                   T·d1·d2
    backward dx = g W, dW = gᵀ x       2·T·d1·d2
    dM|Ω from (dW V) and U             d1·d2·r   (+ d1·|Ω|, negligible)
    total                              3·T·d1·d2 + 2·d1·d2·r

factored (x ↦ x W0ᵀ + ((x V)(U M)ᵀ), W never formed):
    base forward + dx                  2·T·d1·d2   (no dW0: W0 is frozen; 0 without W0)
    h = x V, y += h (U M)ᵀ             T·r·(d1 + d2)
    dh = g (U M), d(U M) = gᵀ h        2·T·d1·r
    dx += dh Vᵀ                        T·r·d2
    total                              2·T·d1·d2 + T·r·(3·d1 + 2·d2)

spectral (x ↦ ((x V)(Σ + M)ᵀ) Uᵀ, no W0, no W, no r×r M; full rank or no residual):
    h = x V, y = z Uᵀ                  T·r·(d1 + d2)
    z = h Σ + h Mᵀ (on Ω)              T·(r + |Ω|)
    dz = g U, dx = dh Vᵀ               T·r·(d1 + d2)
    dh = dz (Σ + M), dM|Ω = Σ_T dz_i h_j   T·(r + 2·|Ω|)
    total                              2·T·r·(d1 + d2) + T·(3·|Ω| + 2·r)

So at full rank (r = min(d1, d2)) spectral beats factored (by 2·T·d1·d2 + T·r·d1 −
T·(3·|Ω| + 2·r) with W0, by T·r·d1 − T·(3·|Ω| + 2·r) without) and beats rebuild on every kernel with max(d1, d2) > 2·min(d1, d2) at any T; a square d×d
kernel costs 4·T·d² against rebuild's 3·T·d² + 2·d³, so spectral wins there only for T < 2d.
At r ≪ min(d1, d2) with W0 kept, factored wins (spectral does not apply: it would drop the
residual W0 − U_r Σ_r V_rᵀ).
"""

from __future__ import annotations

STRATEGY_CHOICES = ("rebuild", "factored", "spectral")


def step_flops(d1: int, d2: int, rank: int, tokens: int, *, has_base: bool = True,
               training: bool = True, entries: int | None = None) -> dict[str, int]:
    """Multiply-adds of one step for one target under each strategy (formulas above).

    Args:
      d1, d2: W's output and input sizes (the paper's orientation).
      rank: rank r of the adapter's update (U_r M V_rᵀ, or LoRA's B A).
      tokens: T, rows of x per call (batch × sequence).
      has_base: whether W0 is applied as a dense matmul in the factored path (False for a
        full-rank SVFT node stored without W0: then W = U (Σ + M) Vᵀ is all factored).
      training: count the backward pass too (False: forward only, e.g. evaluation).
      entries: |Ω|, M's trainable entries (default r, the plain diagonal); only spectral's
        r-space terms read it.
    Returns:
      {"rebuild": flops, "factored": flops, "spectral": flops}.
    """
    dense = d1 * d2
    entries = rank if entries is None else entries
    thin = tokens * rank * (d1 + d2)
    if training:
        rebuild = 3 * tokens * dense + 2 * dense * rank
        factored = (2 * tokens * dense if has_base else 0) + tokens * rank * (3 * d1 + 2 * d2)
        spectral = 2 * thin + tokens * (3 * entries + 2 * rank)
    else:
        rebuild = tokens * dense + dense * rank
        factored = (tokens * dense if has_base else 0) + thin
        spectral = thin + tokens * (entries + rank)
    return {"rebuild": int(rebuild), "factored": int(factored), "spectral": int(spectral)}


def choose_strategy(d1: int, d2: int, rank: int, tokens: int, *, has_base: bool = True,
                    training: bool = True, entries: int | None = None,
                    candidates: tuple[str, ...] = ("rebuild", "factored")) -> str:
    """The candidate with the fewest multiply-adds by `step_flops`.

    Args: as `step_flops`, plus
      candidates: the strategies that can run this target, in order of preference on a tie
        (the default, rebuild and factored, is what any node with a factored `matmul` can
        run; `auto` adds "spectral" for SVFT nodes that are `spectral_ready`). Ties go to the
        earlier name (rebuild first: one dense matmul is better tuned than thin ones).
    Returns:
      the chosen name.
    Raises:
      ValueError for an empty or unknown candidate list.
    """
    unknown = [c for c in candidates if c not in STRATEGY_CHOICES]
    if not candidates or unknown:
        raise ValueError(f"`candidates` must be a non-empty tuple of {STRATEGY_CHOICES}, got {candidates!r}.")
    costs = step_flops(d1, d2, rank, tokens, has_base=has_base, training=training, entries=entries)
    return min(candidates, key=lambda name: (costs[name], candidates.index(name)))
