"""Adapter files and factor stores, for every adapter method: exact round trips, contents,
refusals, and an adapter that keeps its meaning across SVD back-ends.

Truth: the saved tree itself (bit-exact round trips), the merged weights of the trained model,
and valid alternative SVDs of degenerate matrices (rotations inside a repeated singular value's
subspace) that a different routine could return.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import svft_jax
from svft_jax.baselines import dora, lora, vera
from svft_jax.checkpoint import (
    load_adapter,
    load_factor_cache,
    read_adapter,
    save_adapter,
    save_factor_cache,
)
from svft_jax.transform import _factorize

_merge = jax.jit(svft_jax.merge)  # one compile instead of many eager small-op compiles


# (layers, in, out) under a name with no scan mark: its layout is declared, never inferred.
STACKED = {"stacked/kernel": {"layout": "stacked_in_out"}}


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
    """Stand-in for training: random non-zero values in every trainable array and extra."""
    g = np.random.default_rng(seed)

    def fill(x):
        if svft_jax.is_node(x):
            return dataclasses.replace(x, **{f: jnp.asarray(g.normal(size=getattr(x, f).shape), jnp.float32)
                                             for f in x.trainable_fields() if getattr(x, f) is not None})
        if isinstance(x, svft_jax.Trainable):
            return svft_jax.Trainable(x.value + 1.0)
        return x

    return jax.tree_util.tree_map(fill, adapted, is_leaf=lambda x: svft_jax.is_node(x) or isinstance(x, svft_jax.Trainable))


def _mixed_adapted(base, backend="auto"):
    return svft_jax.apply(
        base, "banded", d=1, svd_backend=backend, extra="classifier/.*",
        overrides={"attn/value/kernel": {"pattern": "topk", "k": 10, "d": None, "init": "reference"},
                   "mlp/kernel": {"pattern": "random", "k": 9, "d": None, "seed": 3, "keep_base": False},
                   "stacked/kernel": {"pattern": "plain", "d": None, "layout": "stacked_in_out"}},
    )


def _assert_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)  # same configs and Ω
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


BASELINES = {
    "lora": lambda p, **kw: lora.apply(p, rank=2, **kw),
    "dora": lambda p, **kw: dora.apply(p, rank=2, **kw),
    "vera": lambda p, **kw: vera.apply(p, rank=4, **kw),
    "lora_rslora": lambda p, **kw: lora.apply(p, rank=4, use_rslora=True, **kw),
}


def test_svft_round_trip_with_default_settings_is_bit_exact(tmp_path):
    """The default apply and load use the same (recorded) SVD back-end: bit-identical."""
    base = _base()
    trained = _trained(_mixed_adapted(base))
    path = save_adapter(tmp_path / "adapter.safetensors", trained, base_params=base)  # no SVD arguments
    loaded = load_adapter(path, base)
    _assert_equal(loaded, trained)  # m, gates, factors, Ω and the marked head
    assert isinstance(loaded["classifier"]["kernel"], svft_jax.Trainable)  # the trainable set survives
    _assert_equal(_merge(loaded), _merge(trained))


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_baseline_round_trip_is_bit_exact(tmp_path, method):
    base = _base()
    trained = _trained(BASELINES[method](base, extra="classifier/.*", layouts={"stacked/kernel": "stacked_in_out"}))
    path = save_adapter(tmp_path / f"{method}.safetensors", trained)
    _assert_equal(load_adapter(path, base), trained)


def test_mixed_svft_and_lora_tree_round_trips_bit_exactly(tmp_path):
    base = _base()
    svft_part = svft_jax.apply(base, "banded", d=1, targets=r"attn/.*kernel")
    mixed = _trained(lora.apply(svft_part, rank=2, targets="mlp/kernel"))
    methods = {type(x).method for x in jax.tree_util.tree_leaves(mixed, is_leaf=svft_jax.is_node) if svft_jax.is_node(x)}
    assert methods == {"svft", "lora"}
    path = save_adapter(tmp_path / "mixed.safetensors", mixed)
    _assert_equal(load_adapter(path, base), mixed)


def test_adapter_file_holds_only_trainable_arrays_sketches_and_pattern(tmp_path):
    base = _base()
    trained = _trained(_mixed_adapted(base))
    path = save_adapter(tmp_path / "a.safetensors", trained, base_params=base)
    nodes = [x for x in jax.tree_util.tree_leaves(trained, is_leaf=svft_jax.is_node) if svft_jax.is_node(x)]
    with safe_open(str(path), "numpy") as f:  # the reference safetensors reader
        keys = set(f.keys())
        expected = {f"{n.path}::{field}" for n in nodes for field in ("m", "rows", "cols", "sketch")}
        expected |= {f"{n.path}::gate" for n in nodes if n.gate is not None} | {"extra::classifier/kernel"}
        assert keys == expected
        for n in nodes:
            assert np.array_equal(f.get_tensor(f"{n.path}::m"), np.asarray(n.m))
    payload = sum(n.m.size * (4 + 2 + 2) + (0 if n.gate is None else n.gate.size * 4) + 16 * 8 * max(1, n.layout.stack_shape[0] if n.layout.stack_shape else 1) for n in nodes) + 16 * 4
    assert os.path.getsize(path) < payload + 16 * 1024  # no factors, no base weights
    header = read_adapter(path).header
    assert [t["path"] for t in header["targets"]] == [n.path for n in nodes]
    config = {t["path"]: t for t in header["targets"]}["mlp/kernel"]
    assert (config["method"], config["pattern"], config["svd_backend"], config["svd_dtype"]) == ("svft", "random", "numpy", "float32")


def test_saving_a_split_half_is_refused_with_the_fix(tmp_path):
    trainable, frozen = svft_jax.split(_trained(_mixed_adapted(_base())))
    for half in (trainable, frozen):
        with pytest.raises(ValueError, match=r"half of svft_jax.split.*combine"):
            save_adapter(tmp_path / "a.safetensors", half)
    assert not (tmp_path / "a.safetensors").exists()


def test_keep_base_false_needs_base_params_for_the_fingerprint(tmp_path):
    trained = _trained(_mixed_adapted(_base()))
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


def test_topk_adapter_on_a_symmetric_kernel_reloads_right_after_saving(tmp_path):
    """Symmetric W: |u_iᵀ v_j| is 1 on the diagonal and ties elsewhere, so Ω depends on the SVD
    routine; the recorded back-end makes the reload reproduce it exactly."""
    g = np.random.default_rng(3)
    a = g.normal(size=(8, 8))
    base = {"w": {"kernel": jnp.asarray(a + a.T, jnp.float32)}}
    trained = _trained(svft_jax.apply(base, "topk", k=12))
    _assert_equal(load_adapter(save_adapter(tmp_path / "t.safetensors", trained), base), trained)


def test_adapter_trained_on_xla_svd_merges_identically_on_lapack_factors(tmp_path):
    """Distinct singular values: canonical signs make M portable across back-ends."""
    base = _base()
    trained = _trained(svft_jax.apply(base, "banded", d=2, targets=r"attn/.*kernel|mlp/kernel", svd_backend="jax"))
    path = save_adapter(tmp_path / "a.safetensors", trained)
    on_lapack = load_adapter(path, base, svd_backend="numpy")
    want_tree, got_tree = _merge(trained), _merge(on_lapack)
    for name in ("query", "value"):
        kernel = np.asarray(base["attn"][name]["kernel"])
        delta_jax = np.asarray(want_tree["attn"][name]["kernel"]) - kernel
        delta_np = np.asarray(got_tree["attn"][name]["kernel"]) - kernel
        assert np.linalg.norm(delta_jax) > 0.1 * np.linalg.norm(kernel)  # a real update
        assert np.linalg.norm(delta_np - delta_jax) <= 1e-4 * np.linalg.norm(delta_jax)


def _degenerate_base():
    g = np.random.default_rng(5)
    orthogonal, _ = np.linalg.qr(g.normal(size=(8, 8)))  # every singular value is 1
    low_rank = g.normal(size=(8, 2)) @ g.normal(size=(2, 8))  # six singular values are 0
    return {"ortho": {"kernel": jnp.asarray(orthogonal, jnp.float32)},
            "lowrank": {"kernel": jnp.asarray(low_rank, jnp.float32)}}


def test_degenerate_spectrum_is_flagged_at_apply_time_in_summary():
    adapted = svft_jax.apply(_degenerate_base(), "banded", d=1)
    assert adapted["ortho"]["kernel"].meta.near_repeated == 7  # 8 equal values: 7 zero gaps
    assert adapted["lowrank"]["kernel"].meta.near_repeated >= 5
    text = svft_jax.summary(adapted, print_fn=None)
    assert "7 near-repeated σ" in text and "tied to the SVD back-end" in text
    regular = svft_jax.summary(svft_jax.apply(_base(), "banded", d=1, targets="attn/query/kernel"), print_fn=None)
    assert "near-repeated" not in regular


@pytest.mark.parametrize("target", ["ortho", "lowrank"])
def test_degenerate_adapter_loaded_with_another_svd_backend_is_refused(tmp_path, target):
    """LAPACK and XLA return different singular vectors for repeated singular values (checked:
    the merged updates differ by O(1)); the probe sketch in the file catches it."""
    base = _degenerate_base()
    trained = _trained(svft_jax.apply(base, "banded", d=1, targets=f"{target}/kernel", svd_backend="jax"))
    path = save_adapter(tmp_path / "a.safetensors", trained)
    other = svft_jax.apply(base, "banded", d=1, targets=f"{target}/kernel", svd_backend="numpy")
    other = dataclasses.replace(other[target]["kernel"], m=trained[target]["kernel"].m)
    truth = np.asarray(trained[target]["kernel"].delta())
    assert np.linalg.norm(np.asarray(other.delta()) - truth) > 0.05 * np.linalg.norm(truth)  # the danger is real
    with pytest.raises(ValueError, match=rf"{target}/kernel.*different update.*svd_backend"):
        load_adapter(path, base, svd_backend="numpy")
    _assert_equal(load_adapter(path, base), trained)  # the recorded back-end reproduces it


def test_degenerate_adapter_is_refused_when_the_svd_routine_rotates_the_subspace(tmp_path, monkeypatch):
    """Emulate another platform's valid SVD of an orthogonal matrix: U R, Vᵀ → Rᵀ Vᵀ for a
    rotation R (still W = U Σ Vᵀ since Σ = I); the update U M Vᵀ changes, and the load refuses."""
    base = _degenerate_base()
    trained = _trained(svft_jax.apply(base, "banded", d=1, targets="ortho/kernel"))
    path = save_adapter(tmp_path / "a.safetensors", trained)
    lapack_svd = np.linalg.svd
    rotation, _ = np.linalg.qr(np.random.default_rng(9).normal(size=(8, 8)))

    def rotated_svd(matrix, *args, **kwargs):
        u, s, vt = lapack_svd(matrix, *args, **kwargs)
        return u @ rotation.astype(u.dtype), s, rotation.T.astype(u.dtype) @ vt

    monkeypatch.setattr(np.linalg, "svd", rotated_svd)
    with pytest.raises(ValueError, match="different update"):
        load_adapter(path, base)


def test_adapter_survives_an_svd_that_flips_singular_vector_signs(tmp_path, monkeypatch):
    """A platform (cuSOLVER, TPU) whose valid SVD negates some pairs (u_i, v_i): canonical signs
    undo it and the probe check passes."""
    base = _base()
    trained = _trained(svft_jax.apply(base, "banded", d=2, targets=r"attn/.*kernel"))
    path = save_adapter(tmp_path / "a.safetensors", trained)
    lapack_svd = np.linalg.svd

    def flipping_svd(matrix, *args, **kwargs):
        u, s, vt = lapack_svd(matrix, *args, **kwargs)
        flips = np.where(np.arange(s.shape[-1]) % 2 == 0, -1.0, 1.0).astype(u.dtype)
        return u * flips, s, vt * flips[..., :, None]

    monkeypatch.setattr(np.linalg, "svd", flipping_svd)
    flipped = load_adapter(path, base)
    monkeypatch.undo()
    for want, got in zip(jax.tree_util.tree_leaves(_merge(trained)), jax.tree_util.tree_leaves(_merge(flipped)), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_factor_store_file_rebuilds_without_any_svd(tmp_path, monkeypatch):
    base = _base()
    store = {}
    adapted = svft_jax.apply(base, "banded", d=1, overrides=STACKED, factors=store)
    assert len(store) == 4  # one entry per default target (the stacked kernel is one entry)
    cache = save_factor_cache(tmp_path / "factors.safetensors", store)
    adapter = save_adapter(tmp_path / "a.safetensors", _trained(adapted))

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD ran although factors were cached")

    monkeypatch.setattr(_factorize, "svd_factors", no_svd)
    rebuilt = svft_jax.apply(base, "banded", d=1, overrides=STACKED, factors=load_factor_cache(cache))
    _assert_equal(rebuilt, adapted)
    _assert_equal(load_adapter(adapter, base, factors=cache), _trained(adapted))  # a path works too
    with pytest.raises(AssertionError, match="an SVD ran"):  # the patch is live: without the store, SVDs run
        load_adapter(adapter, base)


def test_factor_store_never_gives_a_target_the_factors_of_other_weights(tmp_path):
    store = {}
    svft_jax.apply(_base(0), "banded", d=1, overrides=STACKED, factors=store)
    other = _base(1)
    from_store = svft_jax.apply(other, "banded", d=1, overrides=STACKED, factors=load_factor_cache(save_factor_cache(tmp_path / "f.safetensors", store)))
    fresh = svft_jax.apply(other, "banded", d=1, overrides=STACKED)
    _assert_equal(from_store, fresh)  # keys are digests of the kernels: all misses, recomputed


def test_adapter_of_another_base_is_refused(tmp_path):
    path = save_adapter(tmp_path / "a.safetensors", _trained(svft_jax.apply(_base(0), "banded", d=1, overrides=STACKED)))
    with pytest.raises(ValueError, match="different base model.*attn/query/kernel"):
        load_adapter(path, _base(1))


def test_factor_store_from_a_tree_says_which_targets_it_leaves_out():
    """bfloat16 factors are not what the SVD computed: left out of the store, and said so."""
    from svft_jax.checkpoint import factor_store

    base = _base()
    adapted = svft_jax.apply(base, "banded", d=1, targets=r"attn/.*kernel|mlp/kernel",
                             overrides={"mlp/kernel": {"factor_dtype": jnp.bfloat16}})
    with pytest.warns(UserWarning, match=r"1 target\(s\) left out.*'mlp/kernel'"):
        store = factor_store(adapted)
    assert len(store) == 2  # the two float32 attention targets
