"""SVD speed paths of `svft_jax.apply`: the "auto" back-end, randomized SVD, the factor cache.

Truth: numpy's LAPACK SVD of the same matrices; the identity W0 = U Σ Vᵀ (+ residual).
"""

import jax
import numpy as np
import pytest

import svft_jax
from svft_jax.checkpoint import factor_key
from svft_jax.transform import _factorize as factorize
from svft_jax.transform._factorize import resolve_backend, svd_factors


def _params(rng):
    return {"a": {"kernel": rng.standard_normal((12, 9)).astype(np.float32)},
            "b": {"kernel": rng.standard_normal((12, 9)).astype(np.float32)},
            "c": {"kernel": rng.standard_normal((9, 20)).astype(np.float32)}}


def test_auto_backend_is_lapack_on_cpu_and_matches_numpy_svd(rng):
    assert jax.default_backend() == "cpu"
    assert resolve_backend("auto") == "numpy"
    matrix = rng.standard_normal((3, 10, 7)).astype(np.float32)
    u, s, v = svd_factors(matrix, 7)  # default backend: auto
    _, s_ref, _ = np.linalg.svd(matrix, full_matrices=False)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5)
    np.testing.assert_allclose(np.einsum("bir,br,bjr->bij", u, s, v), matrix, atol=1e-5)
    u_jax, s_jax, v_jax = svd_factors(matrix, 7, backend="jax")
    np.testing.assert_allclose(u, u_jax, atol=1e-4)  # canonical signs: same factors on both paths
    np.testing.assert_allclose(v, v_jax, atol=1e-4)


def test_apply_default_equals_explicit_backends(rng):
    params = _params(rng)
    for backend in ("numpy", "jax"):
        merged = svft_jax.merge(svft_jax.apply(params, "banded", d=1, keep_base=False, svd_backend=backend))
        for path in ("a", "b", "c"):
            np.testing.assert_allclose(merged[path]["kernel"], params[path]["kernel"], atol=1e-5)
    default = svft_jax.apply(params, "plain")
    numpy_nodes = svft_jax.apply(params, "plain", svd_backend="numpy")
    for got, want in zip(jax.tree.leaves(default), jax.tree.leaves(numpy_nodes), strict=True):
        np.testing.assert_array_equal(got, want)


def test_randomized_svd_recovers_top_triplets_of_a_decaying_spectrum(rng):
    d1, d2, r = 80, 60, 6
    left, _ = np.linalg.qr(rng.standard_normal((d1, d2)))
    right, _ = np.linalg.qr(rng.standard_normal((d2, d2)))
    spectrum = 0.7 ** np.arange(d2)
    matrix = ((left * spectrum) @ right.T).astype(np.float32)
    u, s, v = svd_factors(matrix, r, backend="randomized")
    u_ref, s_ref, v_ref = svd_factors(matrix, r, backend="numpy")
    np.testing.assert_allclose(s, s_ref, rtol=1e-3)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(u) * u_ref, axis=0)), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(u), u_ref, atol=2e-2)  # same canonical signs


def test_randomized_apply_keeps_w0_exact_at_m_zero(rng):
    params = _params(rng)
    adapted = svft_jax.apply(params, "banded", d=1, rank=3, svd_backend="randomized")
    merged = svft_jax.merge(adapted)
    for path in ("a", "b", "c"):
        np.testing.assert_allclose(merged[path]["kernel"], params[path]["kernel"], atol=1e-6)
    with pytest.raises(ValueError, match="svd_backend must be one of"):
        svft_jax.apply(params, svd_backend="lapack")


def test_factor_store_skips_recomputation_and_gives_identical_nodes(rng, monkeypatch):
    params = _params(rng)
    cache = {}
    first = svft_jax.apply(params, "banded", d=1, factors=cache)
    assert len(cache) == 3
    key = factor_key(params["c"]["kernel"].T, 9, "float32", "numpy")
    assert key in cache and cache[key][0].shape == (20, 9)

    def fail(*args, **kwargs):
        raise AssertionError("SVD recomputed despite a cache hit")

    monkeypatch.setattr(factorize, "_numpy_svd", fail)
    second = svft_jax.apply(params, "banded", d=1, factors=cache)
    for got, want in zip(jax.tree.leaves(second), jax.tree.leaves(first), strict=True):
        np.testing.assert_array_equal(got, want)
    changed = dict(params, a={"kernel": params["a"]["kernel"] + 1.0})
    with pytest.raises(AssertionError, match="recomputed"):
        svft_jax.apply(changed, "banded", d=1, factors=cache)  # a changed kernel is a cache miss
