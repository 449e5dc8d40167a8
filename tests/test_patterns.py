"""Patterns Ω: sizes, positions, seeds and the top-k rule, checked against brute force.

Independent truths: the set {(i, j): |i − j| ≤ d} enumerated by hand, |u_iᵀ v_j| computed in
numpy from the node's own factors, and set/seed properties of the random draw.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svft_jax
from svft_jax.patterns import _registry, band_coefficients, budget, get_pattern
from svft_jax.patterns.banded import banded_coefficient_product, banded_left_product
from svft_jax.transform.svft import gather_coefficient_product
from tests import reference


def _params(shape, seed=0, name="layer"):
    rng = np.random.default_rng(seed)
    return {name: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32)}}


def _node(params, pattern, **kwargs):
    # LAPACK on the host: no XLA compile per shape; the SVD back-ends are compared elsewhere.
    adapted = svft_jax.apply(params, pattern, svd_backend="numpy", **kwargs)
    return next(leaf for leaf in adapted.values())["kernel"]


def _positions(node, layer=None):
    rows, cols = node.meta.rows.array, node.meta.cols.array
    if layer is not None:
        rows, cols = rows[layer], cols[layer]
    return list(zip(rows.tolist(), cols.tolist(), strict=True))


def _band_by_hand(r, d):
    return {(i, j) for i in range(r) for j in range(r) if abs(i - j) <= d}


# --- sizes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("d", [0, 1, 2, 3, 9])
def test_banded_count_formula_matches_enumerated_band(r, d):
    expected = len(_band_by_hand(r, d))
    assert svft_jax.banded_count(r, d) == expected
    if d < r:  # the paper's closed form, valid while the band fits in the grid
        assert expected == r * (2 * d + 1) - d * (d + 1)


@pytest.mark.parametrize("d", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
def test_banded_positions_are_exactly_the_band(shape, d):
    node = _node(_params(shape), "banded", d=d)
    r = min(shape)
    positions = _positions(node)
    assert len(positions) == len(set(positions)), "banded pattern repeats a position"
    assert set(positions) == _band_by_hand(r, d)
    assert node.m.shape == (r * (2 * d + 1) - d * (d + 1),)


@pytest.mark.parametrize("rank", [1, 3])
def test_banded_with_reduced_rank_lives_in_rank_by_rank_grid(rank):
    node = _node(_params((8, 6)), "banded", d=1, rank=rank)
    assert set(_positions(node)) == _band_by_hand(rank, 1)
    assert node.u.shape == (6, rank) and node.v.shape == (8, rank)


def test_plain_positions_are_the_diagonal():
    node = _node(_params((7, 4)), "plain")
    assert _positions(node) == [(i, i) for i in range(4)]
    assert node.num_trainable == 4


@pytest.mark.parametrize("pattern", ["random", "topk"])
@pytest.mark.parametrize("k", [1, 5, 25])
def test_count_patterns_train_exactly_k_entries(pattern, k):
    node = _node(_params((5, 5)), pattern, k=k)
    assert node.m.shape == (k,)
    assert node.num_trainable == k
    assert len(set(_positions(node))) == k


@pytest.mark.parametrize("pattern", ["random", "topk"])
@pytest.mark.parametrize("d", [0, 1, 2])
def test_count_patterns_default_to_the_banded_budget_of_d(pattern, d):
    r = 6
    node = _node(_params((r, r + 2)), pattern, d=d)
    assert node.m.shape == (len(_band_by_hand(r, d)),)
    assert budget(r, svft_jax.PatternOptions(d=d)) == len(_band_by_hand(r, d))


# --- random ----------------------------------------------------------------------------------

def test_random_positions_are_distinct_and_in_range():
    r, k = 6, 20
    node = _node(_params((r, 9)), "random", k=k, seed=3)
    positions = _positions(node)
    assert len(set(positions)) == k
    assert all(0 <= i < r and 0 <= j < r for i, j in positions)


def test_random_pattern_is_reproducible_for_the_same_seed():
    params = _params((6, 6))
    first = _node(params, "random", k=9, seed=11)
    second = _node(params, "random", k=9, seed=11)
    assert _positions(first) == _positions(second)


def test_random_pattern_changes_with_the_seed():
    params = _params((8, 8))
    patterns = {tuple(_positions(_node(params, "random", k=10, seed=s))) for s in range(4)}
    # 4 draws of 10 out of 64 positions: equal sets are astronomically unlikely.
    assert len(patterns) == 4


def test_random_pattern_differs_between_target_paths_and_layers():
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)
    stacked = jnp.asarray(rng.normal(size=(3, 8, 8)), jnp.float32)
    adapted = svft_jax.apply(
        {"a": {"kernel": kernel}, "b": {"kernel": kernel}, "s": {"kernel": stacked}},
        "random", k=10, seed=0, svd_backend="numpy", overrides={"s/kernel": {"layout": "stacked_in_out"}},
    )
    a, b, s = (adapted[name]["kernel"] for name in "abs")
    assert set(_positions(a)) != set(_positions(b)), "same weight, different path: Ω must differ"
    assert s.meta.rows.array.shape == (3, 10)
    layers = {frozenset(_positions(s, layer)) for layer in range(3)}
    assert len(layers) == 3, "layers of a stacked kernel must get their own draws"


def test_random_pattern_does_not_depend_on_weight_values():
    # Ω is drawn from (seed, path, layer) only, so fine-tuning the checkpoint keeps Ω.
    first = _node(_params((6, 6), seed=0), "random", k=7)
    second = _node(_params((6, 6), seed=1), "random", k=7)
    assert _positions(first) == _positions(second)


# --- top-k -----------------------------------------------------------------------------------

def _scores_by_hand(u, v):
    """|u_iᵀ v_j| with both vectors cut to their n = min(d1, d2) leading coordinates."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    n = min(u.shape[0], v.shape[0])
    return np.abs(np.einsum("ai,aj->ij", u[:n], v[:n]))


def _assert_is_top_k(positions, scores, k):
    chosen = np.zeros(scores.shape, bool)
    for i, j in positions:
        chosen[i, j] = True
    assert chosen.sum() == k
    if k < scores.size:
        assert scores[chosen].min() >= scores[~chosen].max()


@pytest.mark.parametrize("shape", [(6, 6), (8, 5), (5, 8)])  # square, wide and tall W
@pytest.mark.parametrize("k", [1, 4, 11])
def test_topk_picks_the_k_largest_alignments(shape, k):
    node = _node(_params(shape, seed=2), "topk", k=k)
    # The documented non-square rule: scores over the min(d1, d2) leading coordinates.
    scores = _scores_by_hand(node.u, node.v)
    _assert_is_top_k(_positions(node), scores, k)


def test_topk_square_scores_use_full_singular_vectors():
    node = _node(_params((6, 6), seed=5), "topk", k=6)
    u, v = np.asarray(node.u, np.float64), np.asarray(node.v, np.float64)
    _assert_is_top_k(_positions(node), np.abs(u.T @ v), 6)


def test_topk_stacked_kernel_scores_each_layer_on_its_own_factors():
    node = _node(_params((3, 7, 7), seed=4), "topk", k=5, overrides={"layer/kernel": {"layout": "stacked_in_out"}})
    assert node.meta.rows.array.shape == (3, 5)
    for layer in range(3):
        scores = _scores_by_hand(node.u[layer], node.v[layer])
        _assert_is_top_k(_positions(node, layer), scores, 5)


def test_topk_breaks_ties_by_smaller_flat_index():
    # u = v = I: the r diagonal scores tie at 1, every other score is 0.
    spec = get_pattern("topk")
    eye = np.eye(4)
    rows, cols = spec.indices(4, eye, eye, svft_jax.PatternOptions(k=2), (0,))
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (1, 1)]


def test_topk_pattern_is_invariant_to_sign_flips_of_factors():
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    flips = np.array([1.0, -1.0, -1.0, 1.0])
    spec = get_pattern("topk")
    options = svft_jax.PatternOptions(k=5)
    first = spec.indices(4, u, v, options, (0,))
    second = spec.indices(4, u * flips, v * flips, options, (0,))
    np.testing.assert_array_equal(first, second)


# --- ordering and structured products ---------------------------------------------------------

@pytest.mark.parametrize("pattern", ["random", "topk"])
def test_gathered_patterns_are_sorted_by_column(pattern):
    node = _node(_params((7, 7)), pattern, k=12)
    cols, rows = node.meta.cols.array, node.meta.rows.array
    assert np.all(np.diff(cols) >= 0)
    order = np.lexsort((rows, cols))
    np.testing.assert_array_equal(order, np.arange(cols.size))


@pytest.mark.parametrize("d", [0, 1, 3])
def test_band_coefficients_place_m_on_the_right_diagonals(d):
    r = 5
    rows, cols = get_pattern("banded").indices(r, None, None, svft_jax.PatternOptions(d=d), (0,))
    coeffs = np.arange(1, rows.size + 1, dtype=np.float32)
    bands = np.asarray(jax.jit(lambda c: band_coefficients(c, r, d))(jnp.asarray(coeffs)))
    dense = np.zeros((r, r))
    dense[rows, cols] = coeffs
    for offset in range(-min(d, r - 1), min(d, r - 1) + 1):
        for j in range(r):
            expected = dense[j + offset, j] if 0 <= j + offset < r else 0.0
            assert bands[offset + min(d, r - 1), j] == expected


@pytest.mark.parametrize("d", [0, 1, 2, 6])
def test_banded_structured_product_equals_dense_u_times_m(d):
    r, rng = 6, np.random.default_rng(1)
    rows, cols = get_pattern("banded").indices(r, None, None, svft_jax.PatternOptions(d=d), (0,))
    u = rng.normal(size=(9, r))
    coeffs = rng.normal(size=rows.size)
    dense = np.zeros((r, r))
    dense[rows, cols] = coeffs
    product = jax.jit(lambda u, c: banded_left_product(u, c, rows, cols, svft_jax.PatternOptions(d=d)))
    got = product(jnp.asarray(u, jnp.float32), jnp.asarray(coeffs, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), u @ dense, rtol=1e-5, atol=1e-5)


def _banded_node(shape, d, seed=3):
    """A banded node with random m, so products are checked against reference.dense_m."""
    node = _node(_params(shape, seed=seed), "banded", d=d)
    m = np.random.default_rng(seed).normal(size=node.m.shape).astype(np.float32)
    return dataclasses.replace(node, m=jnp.asarray(m))


@pytest.mark.parametrize("d", [0, 1, 2, 7])
def test_banded_left_product_equals_reference_u_times_m(d):
    node = _banded_node((9, 6), d)
    u = reference.f64(node.u)
    got = jax.jit(lambda n: n.left_product())(node)
    np.testing.assert_allclose(np.asarray(got), u @ reference.dense_m(node), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [0, 1, 2, 7])
def test_banded_coefficient_product_equals_reference_h_times_m_transposed(d):
    node = _banded_node((9, 6), d)
    h = np.random.default_rng(d).normal(size=(3, 4, 6))
    meta = node.meta
    got = jax.jit(lambda h, c: banded_coefficient_product(h, c, meta.rows.array, meta.cols.array, meta.options))(
        jnp.asarray(h, jnp.float32), node.m)
    np.testing.assert_allclose(np.asarray(got), h @ reference.dense_m(node).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["random", "topk"])
def test_gather_coefficient_product_equals_reference(pattern):
    node = _node(_params((8, 7), seed=5), pattern, k=19)
    m = jnp.asarray(np.random.default_rng(0).normal(size=node.m.shape), jnp.float32)
    node = dataclasses.replace(node, m=m)
    h = np.random.default_rng(1).normal(size=(5, 7))
    got = gather_coefficient_product(jnp.asarray(h, jnp.float32), m, node.meta.rows.array, node.meta.cols.array)
    np.testing.assert_allclose(np.asarray(got), h @ reference.dense_m(node).T, rtol=1e-5, atol=1e-5)


def test_banded_coefficient_product_gradient_is_the_numerical_one():
    from jax.test_util import check_grads

    node = _banded_node((7, 7), 2)
    meta = node.meta
    h = jnp.asarray(np.random.default_rng(2).normal(size=(4, 7)), jnp.float32)
    fn = lambda h, c: banded_coefficient_product(h, c, meta.rows.array, meta.cols.array, meta.options)  # noqa: E731
    check_grads(fn, (h, node.m), order=1, modes=("rev", "fwd"), atol=2e-2, rtol=2e-2)


def _primitives(fn, *args):
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def test_banded_products_and_their_gradients_use_no_scatter_or_gather():
    """The band is static slices of one padded array: no `.at[].add` chain (scatter-add) and no
    gather, forward or backward — what lets XLA fuse it into one loop at T·|Ω| cost."""
    node = _banded_node((10, 8), 2)
    meta = node.meta
    h = jnp.ones((6, 8), jnp.float32)

    def loss(h, c):
        z = banded_coefficient_product(h, c, meta.rows.array, meta.cols.array, meta.options)
        um = banded_left_product(jnp.ones((10, 8)), c, meta.rows.array, meta.cols.array, meta.options)
        return jnp.sum(z ** 2) + jnp.sum(um ** 2)

    names = _primitives(jax.grad(loss, argnums=(0, 1)), h, node.m)
    assert not {n for n in names if "scatter" in n or "gather" in n}, names
    assert "pad" in names  # the check sees the structured path


def test_banded_products_keep_only_their_input_for_the_backward_pass():
    """The band's gradient reads x unshifted (its derivative rule shifts the cotangent): the
    forward pass saves x itself, not the 2d shifted copies of it that autodiff's own rule keeps
    (2d extra (T, r) buffers per adapted kernel in a training step)."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    node = _banded_node((10, 8), 2)
    meta = node.meta

    def loss(x, c):
        h = jnp.sin(x)  # an activation, as in a model (not an argument of the differentiated function)
        z = banded_coefficient_product(h, c, meta.rows.array, meta.cols.array, meta.options)
        return jnp.sum(jnp.cos(z))

    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, 8)), jnp.float32)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(loss, x, node.m)
    activations = [line for line in printed.getvalue().splitlines() if line.startswith("f32[6,8]") and "argument" not in line]
    # cos(x) (sin's derivative), h = sin(x) (the band's input) and -sin(z) (cos's derivative): no shifted copies
    assert len(activations) == 3, activations


# --- registry --------------------------------------------------------------------------------

def test_registry_lists_the_four_paper_patterns():
    assert {"plain", "banded", "random", "topk"} <= set(svft_jax.available_patterns())


def test_registering_a_duplicate_name_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        svft_jax.register_pattern(get_pattern("plain"))


@pytest.fixture
def first_column_pattern():
    """A user pattern (the first column of M) registered for one test, then removed."""
    spec = svft_jax.PatternSpec(
        name="test_first_column",
        indices=lambda r, u, v, options, key: (np.arange(r, dtype=np.int32), np.zeros(r, np.int32)),
        count=lambda r, options: r,
        check=lambda options: None,
    )
    svft_jax.register_pattern(spec)
    yield spec
    _registry.PATTERNS.unregister(spec.name)


def test_a_registered_pattern_works_end_to_end(first_column_pattern):
    params = _params((5, 4), seed=7)
    adapted = svft_jax.apply(params, first_column_pattern.name, svd_backend="numpy")
    node = adapted["layer"]["kernel"]
    m = np.arange(1.0, 5.0, dtype=np.float32)
    node = dataclasses.replace(node, m=jnp.asarray(m))
    u, v = np.asarray(node.u, np.float64), np.asarray(node.v, np.float64)
    dense = np.zeros((4, 4))
    dense[:, 0] = m
    expected = np.asarray(params["layer"]["kernel"], np.float64) + (u @ dense @ v.T).T
    np.testing.assert_allclose(np.asarray(jax.jit(svft_jax.merge)({"k": node})["k"]), expected, atol=1e-5)
