"""Adapter files and factor caches: exact round trips, contents, portability across SVD back-ends."""

from __future__ import annotations

import dataclasses
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import svft_jax
from svft_jax.checkpoint import (
    load_adapter,
    load_factor_cache,
    read_adapter,
    save_adapter,
    save_factor_cache,
)

_merge = jax.jit(svft_jax.merge)  # one compile instead of many eager small-op compiles


def _base(seed: int = 0):
    g = np.random.default_rng(seed)
    return {
        "attn": {"query": {"kernel": jnp.asarray(g.normal(size=(8, 8)), jnp.float32), "bias": jnp.zeros(8)},
                 "value": {"kernel": jnp.asarray(g.normal(size=(8, 8)), jnp.float32)}},
        "mlp": {"kernel": jnp.asarray(g.normal(size=(8, 12)), jnp.float32)},
        "stacked": {"kernel": jnp.asarray(g.normal(size=(3, 6, 4)), jnp.float32)},  # nn.scan-style layers
        "classifier": {"kernel": jnp.asarray(g.normal(size=(8, 2)), jnp.float32)},
    }


def _trained(adapted, seed: int = 1):
    """Stand-in for training: random non-zero m (and gates) on every node."""
    g = np.random.default_rng(seed)

    def fill(x):
        if not svft_jax.is_node(x):
            return x
        gate = None if x.gate is None else jnp.asarray(g.normal(size=x.gate.shape), jnp.float32)
        return dataclasses.replace(x, m=jnp.asarray(g.normal(size=x.m.shape), jnp.float32), gate=gate)

    return jax.tree_util.tree_map(fill, adapted, is_leaf=svft_jax.is_node)


def _mixed_adapted(base, backend="numpy"):
    return svft_jax.apply(
        base, "banded", d=1, svd_backend=backend,
        overrides={"attn/value/kernel": {"pattern": "topk", "k": 10, "init": "reference"},
                   "mlp/kernel": {"pattern": "random", "k": 9, "seed": 3, "keep_base": False},
                   "stacked/kernel": {"pattern": "plain", "layout": "stacked_in_out"}},
    )


def _assert_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_adapter_round_trip_reproduces_the_trained_model_exactly(tmp_path):
    base = _base()
    trained = _trained(_mixed_adapted(base))
    trained = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 1.0 if "classifier" in jax.tree_util.keystr(p) else x, trained, is_leaf=svft_jax.is_node)
    path = save_adapter(tmp_path / "adapter.safetensors", trained, extra="classifier/.*", base_params=base,
                        svd_backend="numpy")
    loaded = load_adapter(path, base)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(trained)  # same SVFT meta
    _assert_equal(loaded, trained)  # m, gates, factors and the extra head
    _assert_equal(_merge(loaded), _merge(trained))


def test_adapter_file_holds_only_m_gates_and_pattern(tmp_path):
    base = _base()
    trained = _trained(_mixed_adapted(base))
    path = save_adapter(tmp_path / "a.safetensors", trained, base_params=base)
    nodes = [x for x in jax.tree_util.tree_leaves(trained, is_leaf=svft_jax.is_node) if svft_jax.is_node(x)]
    with safe_open(str(path), "numpy") as f:  # the reference safetensors reader
        keys = set(f.keys())
        expected = {f"{n.meta.path}::{field}" for n in nodes for field in ("m", "rows", "cols")}
        expected |= {f"{n.meta.path}::gate" for n in nodes if n.gate is not None}
        assert keys == expected
        for n in nodes:
            assert np.array_equal(f.get_tensor(f"{n.meta.path}::m"), np.asarray(n.m))
    payload = sum(n.m.size * (4 + 2 + 2) + (0 if n.gate is None else n.gate.size * 4) for n in nodes)  # m f32, Ω u16
    header_budget = 16 * 1024
    assert os.path.getsize(path) < payload + header_budget  # no factors, no base weights
    header = read_adapter(path).header
    assert [t["path"] for t in header["targets"]] == [n.meta.path for n in nodes]
    assert {t["path"]: t["pattern"] for t in header["targets"]}["mlp/kernel"] == "random"


def test_keep_base_false_needs_base_params_for_the_fingerprint(tmp_path):
    base = _base()
    trained = _trained(_mixed_adapted(base))
    with pytest.raises(ValueError, match="keep_base=False.*base_params"):
        save_adapter(tmp_path / "a.safetensors", trained)
    assert not (tmp_path / "a.safetensors").exists()


def test_existing_adapter_is_not_overwritten_unless_asked(tmp_path):
    base = _base()
    first = save_adapter(tmp_path / "a.safetensors", _trained(_mixed_adapted(base), 1), base_params=base)
    before = first.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(first, _trained(_mixed_adapted(base), 2), base_params=base)
    assert first.read_bytes() == before
    save_adapter(first, _trained(_mixed_adapted(base), 2), base_params=base, overwrite=True)
    assert first.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temp files left


def test_adapter_trained_on_jax_svd_merges_identically_on_numpy_lapack_factors(tmp_path):
    """Canonical signs make M portable: banded off-diagonal entries m_ij u_i v_jᵀ flip sign
    if u_i, v_i are flipped, so without canonicalisation the merged weights would differ."""
    base = _base()
    adapted = svft_jax.apply(base, "banded", d=2, targets=r"attn/.*kernel|mlp/kernel", svd_backend="jax")
    trained = _trained(adapted)
    path = save_adapter(tmp_path / "a.safetensors", trained)
    on_lapack = load_adapter(path, base, svd_backend="numpy")
    want_tree, got_tree = _merge(trained), _merge(on_lapack)
    for want, got in zip(jax.tree_util.tree_leaves(want_tree), jax.tree_util.tree_leaves(got_tree), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # ΔW itself (not just W0 + ΔW) agrees, measured against its own size.
    for name in ("query", "value"):
        kernel = np.asarray(base["attn"][name]["kernel"])
        delta_jax = np.asarray(want_tree["attn"][name]["kernel"]) - kernel
        delta_np = np.asarray(got_tree["attn"][name]["kernel"]) - kernel
        assert np.linalg.norm(delta_jax) > 0.1 * np.linalg.norm(kernel)  # a real update
        assert np.linalg.norm(delta_np - delta_jax) <= 1e-4 * np.linalg.norm(delta_jax)


def test_adapter_survives_an_svd_that_flips_singular_vector_signs(tmp_path, monkeypatch):
    """XLA:CPU and LAPACK agree on signs here, so emulate a platform (cuSOLVER, TPU) whose
    valid SVD returns some pairs (u_i, v_i) negated: the canonical signs must undo it."""
    base = _base()
    trained = _trained(svft_jax.apply(base, "banded", d=2, targets=r"attn/.*kernel", svd_backend="numpy"))
    path = save_adapter(tmp_path / "a.safetensors", trained, svd_backend="numpy")
    lapack_svd = np.linalg.svd

    def flipping_svd(matrix, *args, **kwargs):
        u, s, vt = lapack_svd(matrix, *args, **kwargs)
        flips = np.where(np.arange(s.shape[-1]) % 2 == 0, -1.0, 1.0).astype(u.dtype)  # negate every other pair
        return u * flips, s, vt * flips[:, None]

    monkeypatch.setattr(np.linalg, "svd", flipping_svd)
    flipped = load_adapter(path, base)
    monkeypatch.undo()
    u_flipped = lapack_svd(np.asarray(base["attn"]["query"]["kernel"]).T)[0]
    assert not np.allclose(flipping_svd(np.asarray(base["attn"]["query"]["kernel"]).T)[0], u_flipped)  # the flip is real
    for want, got in zip(jax.tree_util.tree_leaves(_merge(trained)), jax.tree_util.tree_leaves(_merge(flipped)), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_factor_cache_rebuilds_the_adapted_tree_without_any_svd(tmp_path, monkeypatch):
    base = _base()
    adapted = _mixed_adapted(base)
    cache = save_factor_cache(tmp_path / "factors.safetensors", adapted, base_params=base)
    adapter = save_adapter(tmp_path / "a.safetensors", _trained(adapted), base_params=base, svd_backend="numpy")

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD ran although factors were cached")

    monkeypatch.setattr(importlib.import_module("svft_jax.transform.apply"), "svd_factors", no_svd)
    rebuilt = load_factor_cache(cache, base)
    assert jax.tree_util.tree_structure(rebuilt) == jax.tree_util.tree_structure(adapted)
    _assert_equal(rebuilt, adapted)
    via_cache = load_adapter(adapter, base, factors=cache)
    _assert_equal(_merge(via_cache), _merge(_trained(adapted)))
    with pytest.raises(AssertionError, match="an SVD ran"):  # the patch is live: apply would SVD
        load_adapter(adapter, base)


def test_factor_cache_of_another_base_is_refused(tmp_path):
    cache = save_factor_cache(tmp_path / "f.safetensors", _mixed_adapted(_base(0)), base_params=_base(0))
    with pytest.raises(ValueError, match="different base model.*attn/query/kernel"):
        load_factor_cache(cache, _base(1))
