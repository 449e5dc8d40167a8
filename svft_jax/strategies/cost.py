"""The FLOP cost model that `strategy="auto"` uses to pick rebuild or factored per target.

Counts multiply-adds of one training step (forward + backward) for one target W: d1 × d2
applied to T tokens, where the adapter's update has rank r (SVFT: r singular triplets;
LoRA: its rank). Only W0 and the adapter's factors are frozen; the input x needs a gradient.

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

So factored wins when T·r·(3·d1 + 2·d2) < T·d1·d2 + 2·d1·d2·r: always for r ≪ min(d1, d2),
and for full rank (r = d) only when the step has fewer than about d/2 tokens.
"""

from __future__ import annotations

STRATEGY_CHOICES = ("rebuild", "factored")


def step_flops(d1: int, d2: int, rank: int, tokens: int, *, has_base: bool = True,
               training: bool = True) -> dict[str, int]:
    """Multiply-adds of one step for one target under each strategy.

    Args:
      d1, d2: W's output and input sizes (the paper's orientation).
      rank: rank r of the adapter's update (U_r M V_rᵀ, or LoRA's B A).
      tokens: T, rows of x per call (batch × sequence).
      has_base: whether W0 is applied as a dense matmul in the factored path (False for a
        full-rank SVFT node stored without W0: then W = U (Σ + M) Vᵀ is all factored).
      training: count the backward pass too (False: forward only, e.g. evaluation).
    Returns:
      {"rebuild": flops, "factored": flops}.
    """
    dense = d1 * d2
    if training:
        rebuild = 3 * tokens * dense + 2 * dense * rank
        factored = (2 * tokens * dense if has_base else 0) + tokens * rank * (3 * d1 + 2 * d2)
    else:
        rebuild = tokens * dense + dense * rank
        factored = (tokens * dense if has_base else 0) + tokens * rank * (d1 + d2)
    return {"rebuild": int(rebuild), "factored": int(factored)}


def choose_strategy(d1: int, d2: int, rank: int, tokens: int, *, has_base: bool = True,
                    training: bool = True) -> str:
    """"factored" when the cost model says it needs fewer FLOPs than "rebuild", else "rebuild".

    Ties go to "rebuild" (one dense matmul is better tuned than two thin ones).
    """
    costs = step_flops(d1, d2, rank, tokens, has_base=has_base, training=training)
    return "factored" if costs["factored"] < costs["rebuild"] else "rebuild"
