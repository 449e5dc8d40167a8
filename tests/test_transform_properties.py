"""The paper's §3 properties of W(M) = W0 + U M Vᵀ, for every pattern and for rank < r.

Each test checks one property against linear algebra done independently in numpy
(float64): M = 0 gives W0; a diagonal M keeps U and V as singular vectors; rank(U M Vᵀ) ≤
min(|Ω|, r); a dense Ω reaches any target; the trainable count is |Ω|.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svft_jax

merge = jax.jit(svft_jax.merge)  # one compiled program per shape instead of many eager ops

# Kernels are Flax Dense (in, out): W = kernelᵀ is (out × in) = (8 × 6) here, r = 6.
IN, OUT = 6, 8
R = min(IN, OUT)

PATTERNS = [
    pytest.param("plain", {}, id="plain"),
    *[pytest.param("banded", {"d": d}, id=f"banded-d{d}") for d in range(4)],
    pytest.param("random", {"k": 7}, id="random-k7"),
    pytest.param("topk", {"k": 7}, id="topk-k7"),
]
REDUCED_RANK = [
    pytest.param("plain", {"rank": 3}, id="plain-rank3"),
    pytest.param("banded", {"d": 1, "rank": 3}, id="banded-d1-rank3"),
    pytest.param("random", {"k": 4, "rank": 3}, id="random-k4-rank3"),
    pytest.param("topk", {"k": 4, "rank": 3}, id="topk-k4-rank3"),
]


def _kernel(shape=(IN, OUT), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _adapt(kernel, pattern, **kwargs):
    kwargs.setdefault("svd_backend", "numpy")
    return svft_jax.apply({"layer": {"kernel": kernel}}, pattern, **kwargs)


def _with_random_m(adapted, seed=1):
    node = adapted["layer"]["kernel"]
    m = np.random.default_rng(seed).normal(size=node.m.shape).astype(np.float32)
    return {"layer": {"kernel": dataclasses.replace(node, m=jnp.asarray(m))}}


def _merged_w(adapted):
    """The merged W = kernelᵀ in float64."""
    return np.asarray(merge(adapted)["layer"]["kernel"], np.float64).T


def _dense_m(node):
    dense = np.zeros((node.meta.rank, node.meta.rank))
    np.add.at(dense, (node.meta.rows.array, node.meta.cols.array), np.asarray(node.m, np.float64))
    return dense


# --- M = 0 reproduces W0 ---------------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "options"), PATTERNS + REDUCED_RANK)
def test_zero_m_reproduces_w0_exactly_with_kept_base(pattern, options):
    kernel = _kernel()
    merged = merge(_adapt(kernel, pattern, **options))["layer"]["kernel"]
    assert merged.dtype == kernel.dtype
    np.testing.assert_array_equal(np.asarray(merged), np.asarray(kernel))


@pytest.mark.parametrize(("pattern", "options"), PATTERNS)
def test_zero_m_reproduces_w0_to_float_tolerance_without_base(pattern, options):
    kernel = _kernel()
    adapted = _adapt(kernel, pattern, keep_base=False, **options)
    assert adapted["layer"]["kernel"].base is None
    merged = merge(adapted)["layer"]["kernel"]
    np.testing.assert_allclose(np.asarray(merged), np.asarray(kernel), atol=2e-5)


# --- diagonal M keeps the singular vectors ------------------------------------------------

@pytest.mark.parametrize("keep_base", [True, False])
def test_diagonal_m_gives_u_diag_s_plus_m_vt(keep_base):
    adapted = _with_random_m(_adapt(_kernel(), "plain", keep_base=keep_base))
    node = adapted["layer"]["kernel"]
    u, s, v = (np.asarray(x, np.float64) for x in (node.u, node.s, node.v))
    m = np.asarray(node.m, np.float64)
    np.testing.assert_allclose(_merged_w(adapted), u @ np.diag(s + m) @ v.T, atol=2e-5)


def test_diagonal_m_keeps_u_and_v_as_singular_vector_pairs():
    adapted = _with_random_m(_adapt(_kernel(), "plain"))
    node = adapted["layer"]["kernel"]
    u, s, v = (np.asarray(x, np.float64) for x in (node.u, node.s, node.v))
    sigma = s + np.asarray(node.m, np.float64)
    w = _merged_w(adapted)
    np.testing.assert_allclose(w @ v, u * sigma, atol=2e-5)  # W v_i = σ_i u_i
    np.testing.assert_allclose(w.T @ u, v * sigma, atol=2e-5)  # Wᵀ u_i = σ_i v_i
    # ... so W's singular values are |s + m| (numpy's own SVD of the merged weight).
    np.testing.assert_allclose(np.linalg.svd(w, compute_uv=False), np.sort(np.abs(sigma))[::-1], atol=2e-5)


def test_diagonal_m_with_reduced_rank_still_shifts_the_kept_triplets():
    rank = 3
    adapted = _with_random_m(_adapt(_kernel(), "plain", rank=rank))
    node = adapted["layer"]["kernel"]
    u, s, v = (np.asarray(x, np.float64) for x in (node.u, node.s, node.v))
    sigma = s + np.asarray(node.m, np.float64)
    w = _merged_w(adapted)
    # The frozen residual W0 − U_r Σ_r V_rᵀ is orthogonal to V_r and U_r.
    np.testing.assert_allclose(w @ v, u * sigma, atol=2e-5)
    np.testing.assert_allclose(w.T @ u, v * sigma, atol=2e-5)


# --- rank bound ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("pattern", "options"),
    [*PATTERNS, *REDUCED_RANK,
     pytest.param("random", {"k": 2}, id="random-k2"), pytest.param("topk", {"k": 3}, id="topk-k3")],
)
def test_update_rank_is_at_most_min_of_omega_and_r(pattern, options):
    adapted = _with_random_m(_adapt(_kernel(), pattern, **options))
    node = adapted["layer"]["kernel"]
    delta = _merged_w(adapted) - np.asarray(node.base, np.float64).T
    bound = min(node.meta.num_entries, node.meta.rank)
    assert np.linalg.matrix_rank(delta, tol=1e-4) <= bound
    # and the bound is not vacuous: the same update built in numpy has exactly that rank
    u, v = np.asarray(node.u, np.float64), np.asarray(node.v, np.float64)
    assert np.linalg.matrix_rank(u @ _dense_m(node) @ v.T, tol=1e-6) == np.linalg.matrix_rank(delta, tol=1e-4)


# --- expressivity ----------------------------------------------------------------------------

DENSE_OMEGA = [
    pytest.param("banded", {"d": R - 1, "keep_base": True}, id="banded-d=r-1"),
    pytest.param("banded", {"d": R - 1, "keep_base": False}, id="banded-d=r-1-no-base"),
    pytest.param("random", {"k": R * R, "keep_base": True}, id="random-k=r2"),
    pytest.param("topk", {"k": R * R, "keep_base": False}, id="topk-k=r2-no-base"),
]


def _solve_for_target(node, target_w, keep_base):
    """m such that merge gives target_w: M = Uᵀ (T − W0) V, or Uᵀ T V − diag(s) without W0."""
    u, v = np.asarray(node.u, np.float64), np.asarray(node.v, np.float64)
    if keep_base:
        dense = u.T @ (target_w - np.asarray(node.base, np.float64).T) @ v
    else:
        dense = u.T @ target_w @ v - np.diag(np.asarray(node.s, np.float64))
    return dense[node.meta.rows.array, node.meta.cols.array]


@pytest.mark.parametrize(("pattern", "options"), DENSE_OMEGA)
def test_dense_omega_reaches_an_arbitrary_square_target(pattern, options):
    kernel = _kernel((R, R))
    target_w = np.random.default_rng(9).normal(size=(R, R))
    adapted = _adapt(kernel, pattern, **options)
    node = adapted["layer"]["kernel"]
    assert node.meta.num_entries == R * R
    m = _solve_for_target(node, target_w, options["keep_base"])
    adapted = {"layer": {"kernel": dataclasses.replace(node, m=jnp.asarray(m, jnp.float32))}}
    np.testing.assert_allclose(_merged_w(adapted), target_w, atol=1e-4)


def test_sparse_omega_cannot_reach_a_generic_target():
    # Contrast for the test above: with |Ω| = r the reachable set is r-dimensional.
    kernel = _kernel((R, R))
    target_w = np.random.default_rng(9).normal(size=(R, R))
    adapted = _adapt(kernel, "plain")
    node = adapted["layer"]["kernel"]
    m = _solve_for_target(node, target_w, True)
    adapted = {"layer": {"kernel": dataclasses.replace(node, m=jnp.asarray(m, jnp.float32))}}
    assert np.abs(_merged_w(adapted) - target_w).max() > 0.1


# --- trainable counts ------------------------------------------------------------------------

def test_trainable_counts_follow_the_formulas_for_every_target():
    rng = np.random.default_rng(0)
    params = {
        "plain": {"kernel": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)},   # r = 6
        "banded": {"kernel": jnp.asarray(rng.normal(size=(9, 7)), jnp.float32)},  # r = 7
        "budget": {"kernel": jnp.asarray(rng.normal(size=(5, 5)), jnp.float32)},  # r = 5
        "topk": {"kernel": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)},    # r = 4
        "stacked": {"kernel": jnp.asarray(rng.normal(size=(3, 6, 5)), jnp.float32)},  # 3 × r = 5
        "head": {"bias": jnp.zeros(4)},
    }
    adapted = svft_jax.apply(
        params, "plain", svd_backend="numpy", targets=r".*/kernel",
        overrides={
            "banded/.*": {"pattern": "banded", "d": 2},
            "budget/.*": {"pattern": "random", "d": 1},
            "topk/.*": {"pattern": "topk", "k": 10},
            "stacked/.*": {"pattern": "banded", "d": 1, "layout": "stacked_in_out"},
        },
    )
    expected = {
        "plain": 6,
        "banded": 7 * 5 - 2 * 3,          # r(2d+1) − d(d+1)
        "budget": 5 * 3 - 1 * 2,          # random without k: the banded budget of d = 1
        "topk": 10,
        "stacked": 3 * (5 * 3 - 1 * 2),   # per layer
    }
    for name, count in expected.items():
        assert adapted[name]["kernel"].num_trainable == count, name
    counts = svft_jax.count_parameters(adapted)
    assert counts["trainable"] == sum(expected.values())
    assert counts["total"] == sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    assert counts["targets"] == 5
