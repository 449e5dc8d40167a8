"""`merge` against a dense numpy reference built by hand, for every pattern and kernel layout.

The reference reads only the node's arrays (u, s, v, m, gate, base) and Ω (meta.rows/cols);
it reshapes kernels to W (out × in) with hand-written numpy per layout, scatters M densely
and computes W0 + U M Vᵀ in float64. Nothing from svft_jax's layout or merge code is reused.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svft_jax
from tests import reference

merge = jax.jit(svft_jax.merge)

# name -> (kernel shape, kernel -> W (*stack, d1, d2), W -> kernel), all by hand in numpy.
LAYOUTS = {
    "dense": ((5, 7), lambda k: k.T, lambda w: w.T),  # flax Dense (in, out)
    "dense_general_in": ((6, 2, 3), lambda k: k.reshape(6, 6).T, lambda w: w.T.reshape(6, 2, 3)),
    "dense_general_out": ((2, 3, 6), lambda k: k.reshape(6, 6).T, lambda w: w.T.reshape(2, 3, 6)),
    "stacked": ((3, 5, 4), lambda k: k.transpose(0, 2, 1), lambda w: w.transpose(0, 2, 1)),
    "stacked_dense_general": (
        (2, 6, 3, 2),
        lambda k: k.reshape(2, 6, 6).transpose(0, 2, 1),
        lambda w: w.transpose(0, 2, 1).reshape(2, 6, 3, 2),
    ),
    "gpt2_conv1d": ((4, 7), lambda k: k, lambda w: w),  # (out, in), declared via overrides
}
# Every 3-D kernel here could be read several ways, so each layout is declared (never inferred).
OVERRIDES = {
    "dense_general_in/kernel": {"layout": "attention_qkv"},
    "dense_general_out/kernel": {"layout": "attention_out"},
    "stacked/kernel": {"layout": "stacked_in_out"},
    "stacked_dense_general/kernel": {"layout": "attention_qkv"},
    "gpt2_conv1d/kernel": {"layout": "out_in"},
}


def _overrides(params):
    """The declared layouts of the kernels in `params` (apply refuses an override matching none)."""
    return {regex: value for regex, value in OVERRIDES.items() if regex.split("/")[0] in params}
PATTERNS = {
    "plain": {},
    "banded": {"d": 1},
    "random": {"k": 5},
    "topk": {"k": 5},
}


def _params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return {
        name: {"kernel": jnp.asarray(rng.normal(size=shape), dtype), "bias": jnp.ones(shape[-1])}
        for name, (shape, _, _) in LAYOUTS.items()
    }


def _randomize_trainables(adapted, seed=1):
    """Every node gets random m (and a random gate where it has one)."""
    rng = np.random.default_rng(seed)

    def one(node):
        if not svft_jax.is_node(node):
            return node
        m = jnp.asarray(rng.normal(size=node.m.shape), jnp.float32)
        gate = None if node.gate is None else jnp.asarray(rng.normal(size=node.gate.shape), jnp.float32)
        return dataclasses.replace(node, m=m, gate=gate)

    return jax.tree_util.tree_map(one, adapted, is_leaf=svft_jax.is_node)


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


dense_coefficients = reference.dense_m


def reference_w(node, to_w):
    """W0 + U M Vᵀ (or U (diag(s) + M) Vᵀ without a base), float64, (*stack, d1, d2)."""
    return reference.weight(node, to_matrix=to_w)


@functools.cache
def _adapted_and_merged(pattern):
    """One apply and one compiled merge per pattern, shared by the per-layout tests."""
    params = _params()
    adapted = _randomize_trainables(
        svft_jax.apply(params, pattern, overrides=_overrides(params), **PATTERNS[pattern])
    )
    return params, adapted, merge(adapted)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_merge_equals_dense_numpy_reference(pattern, layout):
    params, adapted, merged = _adapted_and_merged(pattern)
    shape, to_w, from_w = LAYOUTS[layout]
    node = adapted[layout]["kernel"]
    assert svft_jax.is_node(node)
    got = merged[layout]["kernel"]
    assert got.shape == shape and got.dtype == params[layout]["kernel"].dtype
    np.testing.assert_allclose(_f64(got), from_w(reference_w(node, to_w)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged[layout]["bias"], params[layout]["bias"])  # untouched


@pytest.mark.parametrize("pattern", ["random", "topk"])
def test_stacked_kernels_get_per_layer_indices(pattern):
    _, adapted, _ = _adapted_and_merged(pattern)
    node = adapted["stacked"]["kernel"]
    assert node.meta.rows.array.shape == (3, PATTERNS[pattern]["k"])
    assert node.m.shape == (3, PATTERNS[pattern]["k"])


def test_stacked_shared_patterns_use_one_index_set():
    _, adapted, _ = _adapted_and_merged("banded")
    node = adapted["stacked"]["kernel"]
    r = 4
    assert node.meta.rows.array.shape == (r * 3 - 2,)
    assert node.m.shape == (3, r * 3 - 2)


def test_each_layer_of_a_stacked_kernel_is_its_own_svd():
    params, adapted, _ = _adapted_and_merged("plain")
    node = adapted["stacked"]["kernel"]
    kernel = np.asarray(params["stacked"]["kernel"], np.float64)
    for layer in range(3):
        expected = np.linalg.svd(kernel[layer].T, compute_uv=False)
        np.testing.assert_allclose(_f64(node.s[layer]), expected, rtol=1e-5)


# --- dtypes ----------------------------------------------------------------------------------

def test_bfloat16_factors_merge_in_float32_into_a_float32_kernel():
    params = {"dense": _params()["dense"]}
    adapted = _randomize_trainables(svft_jax.apply(params, "banded", d=1, factor_dtype=jnp.bfloat16))
    node = adapted["dense"]["kernel"]
    assert node.u.dtype == node.s.dtype == node.v.dtype == jnp.bfloat16
    assert node.m.dtype == jnp.float32
    got = merge(adapted)["dense"]["kernel"]
    assert got.dtype == jnp.float32
    _, to_w, from_w = LAYOUTS["dense"]
    # The reference uses the stored bf16 factors exactly; agreement far below bf16's 2^-8
    # resolution shows the product is accumulated in float32, not bfloat16.
    np.testing.assert_allclose(_f64(got), from_w(reference_w(node, to_w)), rtol=1e-5, atol=1e-5)


def test_bfloat16_kernel_stays_bfloat16_and_is_exact_at_zero_m():
    params = {"dense": {"kernel": _params()["dense"]["kernel"].astype(jnp.bfloat16)}}
    adapted = svft_jax.apply(params, "plain")
    merged = merge(adapted)["dense"]["kernel"]
    assert merged.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(merged, np.float32), np.asarray(params["dense"]["kernel"], np.float32))


def test_bfloat16_kernel_merges_to_the_rounded_float32_reference():
    params = {"dense": {"kernel": _params()["dense"]["kernel"].astype(jnp.bfloat16)}}
    adapted = _randomize_trainables(svft_jax.apply(params, "plain"))
    merged = merge(adapted)["dense"]["kernel"]
    _, to_w, from_w = LAYOUTS["dense"]
    expected = from_w(reference_w(adapted["dense"]["kernel"], to_w))
    # merge rounds once from float32 to bf16: within half a bf16 ulp (2^-9 relative) + f32 noise
    np.testing.assert_allclose(_f64(merged), expected, rtol=2.0**-8, atol=1e-6)


# --- init="reference" and keep_base=False ----------------------------------------------------

def test_reference_init_starts_at_w0_plus_half_u_m_vt():
    params = {name: _params()[name] for name in ("dense", "stacked")}
    adapted = svft_jax.apply(params, "banded", d=1, init="reference", overrides=_overrides(params))
    merged = merge(adapted)
    for name in params:
        node = adapted[name]["kernel"]
        assert node.gate is not None and node.gate.shape == node.meta.layout.stack_shape
        np.testing.assert_array_equal(np.asarray(node.gate), 0.0)
        _, to_w, from_w = LAYOUTS[name]
        u, v = _f64(node.u), _f64(node.v)
        m = dataclasses.replace(node, gate=None)  # the raw m, without the gate
        half_update = 0.5 * u @ dense_coefficients(m) @ np.swapaxes(v, -1, -2)
        expected = from_w(to_w(_f64(node.base)) + half_update)
        np.testing.assert_allclose(_f64(merged[name]["kernel"]), expected, rtol=1e-5, atol=1e-5)
        assert np.abs(half_update).max() > 1e-3, "reference init must move away from W0"


def test_reference_init_gate_scales_m_by_its_sigmoid():
    params = {name: _params()[name] for name in ("dense", "stacked")}
    adapted = _randomize_trainables(svft_jax.apply(params, "random", k=6, init="reference", overrides=_overrides(params)))
    merged = merge(adapted)
    for name in params:
        _, to_w, from_w = LAYOUTS[name]
        np.testing.assert_allclose(
            _f64(merged[name]["kernel"]), from_w(reference_w(adapted[name]["kernel"], to_w)),
            rtol=1e-5, atol=1e-5,
        )


def test_reference_init_m_is_kaiming_normal_and_seeded():
    kernel = jnp.asarray(np.random.default_rng(0).normal(size=(40, 40)), jnp.float32)
    first = svft_jax.apply({"a": {"kernel": kernel}}, "banded", d=2, init="reference", seed=3, svd_backend="numpy")
    again = svft_jax.apply({"a": {"kernel": kernel}}, "banded", d=2, init="reference", seed=3, svd_backend="numpy")
    other = svft_jax.apply({"a": {"kernel": kernel}}, "banded", d=2, init="reference", seed=4, svd_backend="numpy")
    m = np.asarray(first["a"]["kernel"].m)
    n = m.size  # |Ω| = 40·5 − 6 = 194
    np.testing.assert_array_equal(m, np.asarray(again["a"]["kernel"].m))
    assert not np.array_equal(m, np.asarray(other["a"]["kernel"].m))
    # std √(2/|Ω|): the sample std of 194 normals is within 20% with overwhelming probability
    assert abs(m.std() / np.sqrt(2.0 / n) - 1.0) < 0.2


def test_reference_init_seeds_beyond_32_bits_stay_distinct():
    kernel = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6)), jnp.float32)
    draws = [
        np.asarray(svft_jax.apply({"a": {"kernel": kernel}}, "plain", init="reference", seed=s,
                                  svd_backend="numpy")["a"]["kernel"].m)
        for s in (5, 5 + 2**32)
    ]
    assert not np.array_equal(*draws)


@pytest.mark.parametrize("pattern", ["plain", "banded", "topk"])
def test_without_base_merge_is_u_diag_s_plus_m_vt_and_close_to_w0_plus_update(pattern):
    params = {name: _params()[name] for name in ("dense", "stacked", "gpt2_conv1d")}
    adapted = _randomize_trainables(
        svft_jax.apply(params, pattern, keep_base=False, overrides=_overrides(params), **PATTERNS[pattern])
    )
    merged = merge(adapted)
    for name in params:
        node = adapted[name]["kernel"]
        assert node.base is None
        _, to_w, from_w = LAYOUTS[name]
        got = _f64(merged[name]["kernel"])
        np.testing.assert_allclose(got, from_w(reference_w(node, to_w)), rtol=1e-5, atol=1e-5)
        with_base = dataclasses.replace(node, base=params[name]["kernel"])
        np.testing.assert_allclose(got, from_w(reference_w(with_base, to_w)), atol=1e-4)


# --- sign canonicalisation -------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["jax", "numpy"])
def test_largest_entry_of_each_left_singular_vector_is_positive(backend):
    adapted = svft_jax.apply(_params(), "plain", overrides=OVERRIDES, svd_backend=backend)
    for name in LAYOUTS:
        u = _f64(adapted[name]["kernel"].u)  # (*stack, d1, r)
        pivot = np.take_along_axis(u, np.abs(u).argmax(axis=-2)[..., None, :], axis=-2)
        assert np.all(pivot > 0), name


@pytest.mark.parametrize("backend", ["jax", "numpy"])
def test_canonical_factors_still_reconstruct_w0(backend):
    params = _params()
    adapted = svft_jax.apply(params, "plain", overrides=_overrides(params), svd_backend=backend)
    for name, (_, to_w, _) in LAYOUTS.items():
        node = adapted[name]["kernel"]
        u, s, v = _f64(node.u), _f64(node.s), _f64(node.v)
        np.testing.assert_allclose((u * s[..., None, :]) @ np.swapaxes(v, -1, -2),
                                   to_w(_f64(params[name]["kernel"])), atol=1e-5)


def test_jax_and_numpy_backends_give_the_same_signed_factors():
    params = _params()
    by_backend = {
        backend: svft_jax.apply(params, "plain", overrides=_overrides(params), svd_backend=backend)
        for backend in ("jax", "numpy")
    }
    for name in LAYOUTS:
        jax_node, np_node = by_backend["jax"][name]["kernel"], by_backend["numpy"][name]["kernel"]
        s = _f64(np_node.s)
        gaps = np.abs(np.diff(s, axis=-1))
        assert gaps.min() > 1e-3, "test matrices must have distinct singular values"
        for field in ("u", "s", "v"):
            np.testing.assert_allclose(_f64(getattr(jax_node, field)), _f64(getattr(np_node, field)),
                                       atol=1e-4, err_msg=f"{name}.{field}")


def test_float64_svd_agrees_with_float32():
    params = {"dense": _params()["dense"]}
    f32 = svft_jax.apply(params, "plain", svd_dtype="float32")["dense"]["kernel"]
    f64 = svft_jax.apply(params, "plain", svd_dtype="float64")["dense"]["kernel"]
    for field in ("u", "s", "v"):
        np.testing.assert_allclose(_f64(getattr(f32, field)), _f64(getattr(f64, field)), atol=1e-5)
