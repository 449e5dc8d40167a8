"""No silent failures, round two (issue 21): factor stores, checkpoint folders, the legacy
`split(extra=)` + `optimizer` pair, sharding across meshes, bool options, empty kernels.

Truths:
- A factor store hands `apply`/`load_adapter` only this kernel's own SVD: an entry with the
  right key but another kernel's factors, another rank, another dtype or a malformed value
  is refused, naming the target and the store; a correct store gives nodes bit-identical to
  recomputed SVDs (and at keep_base=False, M = 0 reproduces W0 to float32 rounding against a
  float64 numpy reference). Two cache files that disagree on a key are refused naming both.
  `apply(factors=<path>)` reads the file (no SVD runs), as `load_adapter` does.
- A checkpoint folder belongs to one adapter configuration: a second run of another method or
  pattern cannot save there, and the first run's step stays restorable bit for bit.
- The trainable half of `split(adapted, extra=regex)` of an unmarked tree is refused by
  `optimizer(tx)` without `extra` (its head would get exactly-zero updates); with `extra` the
  head's SGD update is exactly −lr·g.
- Kernels committed to other devices than `apply(mesh=...)`'s are refused naming the parameter;
  `shard_params` on a mesh without a "model" axis replicates (fsdp=False) bit-identically.
- Bool options refuse strings ("false" is truthy); a zero-size kernel is refused with its path.
"""

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import svft_jax
from svft_jax import distributed
from svft_jax.baselines import dora, lora
from svft_jax.checkpoint import (
    TrainCheckpointer,
    load_adapter,
    load_factor_cache,
    save_adapter,
    save_factor_cache,
)
from svft_jax.checkpoint.cache import FactorFiles
from svft_jax.transform import _factorize


def _params(seed=0):
    g = np.random.default_rng(seed)
    return {"a": {"kernel": g.normal(size=(12, 8)).astype(np.float32)},
            "b": {"kernel": g.normal(size=(8, 10)).astype(np.float32)},
            "head": {"kernel": g.normal(size=(10, 3)).astype(np.float32)}}


TARGETS = "(a|b)/kernel"


def _key(params, path, rank=None, backend="numpy"):
    kernel = params[path]["kernel"]
    matrix = kernel.T  # flax (in, out) -> W (out, in)
    return _factorize.factor_key(matrix, min(matrix.shape) if rank is None else rank, "float32", backend)


def _store(params, **kwargs):
    store = {}
    svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy", factors=store, **kwargs)
    return store


def _no_svd(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("an SVD ran although the factors are in the store")

    monkeypatch.setattr(_factorize, "svd_factors", fail)


def _assert_nodes_identical(x, y):
    for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- item 3: factor stores -------------------------------------------------------------------

def test_correct_store_gives_identical_nodes_and_keep_base_false_reproduces_w0_in_float64():
    params = _params()
    store = _store(params, keep_base=False)
    from_store = svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy", keep_base=False, factors=store)
    fresh = svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy", keep_base=False)
    _assert_nodes_identical(from_store, fresh)
    node = from_store["a"]["kernel"]
    w = np.asarray(node.u, np.float64) * np.asarray(node.s, np.float64) @ np.asarray(node.v, np.float64).T
    np.testing.assert_allclose(w, params["a"]["kernel"].T.astype(np.float64), atol=2e-6)


def test_store_entry_with_another_kernels_factors_is_refused_naming_target_and_store(tmp_path):
    params, other = _params(0), _params(1)
    good, foreign = _store(params), _store(other)
    key = _key(params, "a")
    bad = dict(good)
    bad[key] = foreign[_key(other, "a")]  # right key, wrong values (same shapes, a real SVD)
    with pytest.raises(ValueError, match=r"factors=.*dict.*'a/kernel'.*wrong factors.*not the SVD of this kernel"):
        svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy", keep_base=False, factors=bad)
    path = save_factor_cache(tmp_path / "bad.safetensors", bad)
    with pytest.raises(ValueError, match=rf"factor cache '{path}'.*'a/kernel'.*wrong factors"):
        svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy", factors=load_factor_cache(path))
    # a right-shaped entry whose s was scaled: U diag(s) Vᵀ no longer reproduces W0
    u, s, v = good[key]
    with pytest.raises(ValueError, match="'a/kernel'.*wrong factors"):
        svft_jax.apply(params, "plain", targets=TARGETS, svd_backend="numpy", keep_base=False, factors={**good, key: (u, 1.5 * s, v)})


@pytest.mark.parametrize("pattern, options", [("banded", dict(d=1)), ("plain", {})])
def test_store_entry_of_another_rank_is_refused(pattern, options):
    params = _params()
    rank4 = {}
    svft_jax.apply(params, pattern, rank=4, targets="a/kernel", svd_backend="numpy", factors=rank4, **options)
    (entry,) = rank4.values()
    store = {_key(params, "a", rank=6): entry}  # a rank-4 entry under the rank-6 key
    with pytest.raises(ValueError, match=r"'a/kernel' has rank 4.*adapted at rank 6"):
        svft_jax.apply(params, pattern, rank=6, targets="a/kernel", svd_backend="numpy", factors=store, **options)


def test_malformed_or_other_dtype_store_entries_are_refused():
    params = _params()
    store = _store(params)
    key = _key(params, "a")
    u, s, v = store[key]
    for entry, words in [((u, s), "malformed.*triple"), ("usv", "malformed"), ((u, s, object()), "malformed.*v is not an array"),
                         ((u.astype(np.float64), s, v), "u of dtype float64.*svd_dtype='float32'"),
                         ((u, s, v.astype(np.float16)), "v of dtype float16")]:
        with pytest.raises(ValueError, match=rf"'a/kernel'.*{words}"):
            svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy", factors={**store, key: entry})


def test_conflicting_duplicate_cache_files_are_refused_naming_both(tmp_path):
    params, other = _params(0), _params(1)
    good = _store(params)
    key = _key(params, "a")
    first = save_factor_cache(tmp_path / "x" / "f1.safetensors", good)
    second = save_factor_cache(tmp_path / "x" / "f2.safetensors", {key: _store(other)[_key(other, "a")]})
    with pytest.raises(ValueError, match=rf"'{first}' and '{second}'.*different factors"):
        load_factor_cache(tmp_path / "x")
    # an identical duplicate is the same entry: accepted
    save_factor_cache(tmp_path / "y" / "f1.safetensors", good)
    save_factor_cache(tmp_path / "y" / "f2.safetensors", {key: good[key]})
    assert set(FactorFiles(sorted((tmp_path / "y").iterdir()))) == set(good)


@pytest.mark.parametrize("as_path", [str, Path])
def test_apply_reads_a_factor_cache_path_like_load_adapter(tmp_path, monkeypatch, as_path):
    params = _params()
    store = _store(params)
    fresh = svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy")
    path = save_factor_cache(tmp_path / "factors.safetensors", store)
    _no_svd(monkeypatch)
    from_path = svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy", factors=as_path(path))
    _assert_nodes_identical(from_path, fresh)
    with pytest.raises(TypeError, match="`factors` must be a factor store.*got int"):
        svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy", factors=42)


def test_mesh_apply_does_not_write_rounded_factors_into_a_store():
    """Over a mesh only factor_dtype copies exist; a bfloat16 copy is not the SVD's factors."""
    params = _params()
    store = {}
    with pytest.warns(UserWarning, match="not written to the factor store"):
        svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy", factor_dtype=jnp.bfloat16,
                       mesh=distributed.make_mesh(8, 1), factors=store)
    assert store == {}


# ---- item 12: the load_adapter refusal says what is wrong -----------------------------------

def test_load_adapter_with_a_wrong_store_blames_the_store_not_the_spectrum(tmp_path):
    params, other = _params(0), _params(1)
    adapted = svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy")
    adapted["a"]["kernel"] = adapted["a"]["kernel"].with_trainable({"m": np.linspace(-1, 1, adapted["a"]["kernel"].m.size)})
    path = save_adapter(tmp_path / "adapter.safetensors", adapted)
    foreign = _store(other)
    wrong = {**_store(params), _key(params, "a"): foreign[_key(other, "a")]}
    with pytest.raises(ValueError, match="'a/kernel'.*wrong factors") as refusal:
        load_adapter(path, params, factors=wrong)
    assert "repeated" not in str(refusal.value)
    _assert_nodes_identical(load_adapter(path, params, factors=_store(params)), adapted)


# ---- item 4: a checkpoint folder belongs to one adapter configuration ----------------------

def _run_state(method: str):
    g = np.random.default_rng(0)
    params = {"layer": {"kernel": g.normal(size=(6, 5)).astype(np.float32)}}
    if method == "svft":
        adapted = svft_jax.apply(params, "banded", d=1, targets="layer/kernel", svd_backend="numpy")
    elif method == "svft-plain":
        adapted = svft_jax.apply(params, "plain", targets="layer/kernel", svd_backend="numpy")
    else:
        adapted = lora.apply(params, 2, targets="layer/kernel")
    trainable, frozen = svft_jax.split(adapted)
    return jax.tree_util.tree_map(lambda x: x + 0.25, trainable), frozen


@pytest.mark.parametrize("second", ["lora", "svft-plain"])
def test_second_run_of_another_configuration_cannot_delete_the_first_runs_checkpoint(tmp_path, second):
    folder = tmp_path / "ckpt"
    trainable_a, frozen_a = _run_state("svft")
    with TrainCheckpointer(folder, max_to_keep=1, frozen=frozen_a) as run_a:
        run_a.save(1, trainable_a)
    trainable_b, frozen_b = _run_state(second)
    with TrainCheckpointer(folder, max_to_keep=1, frozen=frozen_b) as run_b:
        with pytest.raises(ValueError, match=rf"'{folder}' holds the checkpoints of another adapter configuration.*Nothing was written"):
            run_b.save(2, trainable_b)
        assert run_b.all_steps() == [1]
    with TrainCheckpointer(folder, read_only=True, frozen=frozen_a) as reader:
        restored = reader.restore(1, trainable_a)
    _assert_nodes_identical(restored.trainable, trainable_a)
    # the same configuration resumes in that folder, and retention then works as before
    with TrainCheckpointer(folder, max_to_keep=1, frozen=frozen_a) as resumed:
        assert resumed.save(2, jax.tree_util.tree_map(lambda x: x + 1.0, trainable_a))
        assert resumed.all_steps() == [2]


# ---- item 6: legacy split(extra=) then optimizer(tx) -----------------------------------------

def test_optimizer_without_extra_refuses_the_unmarked_head_of_a_trainable_half():
    params = _params()
    adapted = svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy")  # no extra: unmarked
    trainable, _ = svft_jax.split(adapted, extra="head/.*")
    with pytest.raises(ValueError, match=r"optimizer: 'head/kernel'.*trainable half.*exactly zero.*extra="):
        svft_jax.optimizer(optax.sgd(0.1)).init(trainable)
    # with the same regex the head trains: SGD's update is exactly -lr * g
    tx = svft_jax.optimizer(optax.sgd(0.1), extra="head/.*")
    grads = jax.tree_util.tree_map(jnp.ones_like, trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    np.testing.assert_array_equal(np.asarray(updates["head"]["kernel"]), np.full((10, 3), -0.1, np.float32))
    # the whole tree (no split) is not refused: unlisted leaves are frozen there by design
    svft_jax.optimizer(optax.sgd(0.1)).init(adapted)


# ---- item 11: sharding -----------------------------------------------------------------------

def test_kernels_on_another_mesh_are_refused_naming_the_parameter():
    devices = jax.devices()
    mesh_a = Mesh(np.array(devices[:4]).reshape(4, 1), ("data", "model"))
    mesh_b = Mesh(np.array(devices[4:]).reshape(4, 1), ("data", "model"))
    params = _params()
    on_a = jax.tree_util.tree_map(lambda x: jax.device_put(x, NamedSharding(mesh_a, PartitionSpec())), params)
    with pytest.raises(ValueError, match=r"parameter 'a/kernel' lives on devices \[0, 1, 2, 3\].*spans devices \[4, 5, 6, 7\]"):
        svft_jax.apply(on_a, "banded", d=1, targets=TARGETS, svd_backend="numpy", mesh=mesh_b)
    reference = svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy")
    _assert_nodes_identical(svft_jax.apply(on_a, "banded", d=1, targets=TARGETS, svd_backend="numpy", mesh=mesh_a), reference)


def test_shard_params_on_a_mesh_without_a_model_axis():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    adapted = svft_jax.apply(_params(), "banded", d=1, targets=TARGETS, svd_backend="numpy")
    placed = distributed.shard_params(adapted, mesh)
    _assert_nodes_identical(placed, adapted)
    for leaf in jax.tree_util.tree_leaves(placed):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    with pytest.raises(ValueError, match=r"fsdp=True.*no 'model' axis"):
        distributed.shard_params(adapted, mesh, fsdp=True)
    with pytest.raises(ValueError, match=r"shard_batch.*no 'data' axis"):
        distributed.shard_batch({"x": np.zeros((8, 2))}, Mesh(np.array(jax.devices()), ("model",)))


# ---- item 12: bool options, zero-size kernels -----------------------------------------------

def test_bool_options_refuse_strings(tmp_path):
    params = _params()
    for call, name in [(lambda: lora.apply(params, 2, targets=TARGETS, use_rslora="false"), "use_rslora"),
                       (lambda: dora.apply(params, 2, targets=TARGETS, use_rslora="false"), "use_rslora"),
                       (lambda: dora.apply(params, 2, targets=TARGETS, detach_norm="no"), "detach_norm"),
                       (lambda: svft_jax.apply(params, targets=TARGETS, progress="false"), "progress"),
                       (lambda: svft_jax.apply(params, targets=TARGETS, fsdp="false"), "fsdp"),
                       (lambda: TrainCheckpointer(tmp_path / "c", async_save="false"), "async_save")]:
        with pytest.raises(TypeError, match=rf"`{name}` must be True or False, got '"):
            call()
    assert not (tmp_path / "c").exists()
    # rsLoRA stays off with False: the scale is alpha / r
    assert lora.apply(params, 2, alpha=4.0, targets=TARGETS, use_rslora=np.bool_(False))["a"]["kernel"].meta.scaling == 2.0
    adapted = svft_jax.apply(params, "banded", d=1, targets=TARGETS, svd_backend="numpy")
    path = save_adapter(tmp_path / "adapter.safetensors", adapted)
    before = path.read_bytes()
    adapted["a"]["kernel"] = adapted["a"]["kernel"].with_trainable({"m": np.ones(adapted["a"]["kernel"].m.shape)})
    with pytest.raises(TypeError, match="`overwrite` must be True or False"):
        save_adapter(path, adapted, overwrite="false")  # bool("false") would replace the file
    assert path.read_bytes() == before


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (3, 0, 4)])
def test_zero_size_kernel_is_refused_with_its_path(shape):
    params = {"empty": {"kernel": np.zeros(shape, np.float32)}, **_params()}
    for call in (lambda: svft_jax.apply(params, targets=".*kernel"), lambda: lora.apply(params, 2, targets=".*kernel"),
                 lambda: svft_jax.plan(params, targets=".*kernel")):
        with pytest.raises(ValueError, match=rf"parameter 'empty/kernel'.*zero-size shape {re_shape(shape)}"):
            call()


def re_shape(shape):
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_correct_store_of_a_stacked_kernel_is_read_silently():
    """The checks run layer by layer and are silent on a store apply itself filled."""
    g = np.random.default_rng(3)
    params = {"scan": {"kernel": g.normal(size=(3, 8, 6)).astype(np.float32)}}
    options = dict(targets="scan/kernel", svd_backend="numpy", overrides={"scan/kernel": {"layout": "stacked_in_out"}})
    store = {}
    first = svft_jax.apply(params, "banded", d=1, factors=store, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = svft_jax.apply(params, "banded", d=1, factors=store, **options)
    _assert_nodes_identical(again, first)
    (key,) = store
    u, s, v = store[key]
    u = u.copy()
    u[2] = u[1]  # layer 2 given layer 1's left vectors
    with pytest.raises(ValueError, match=r"'scan/kernel' holds wrong factors \(layer 2 of the stack\)"):
        svft_jax.apply(params, "banded", d=1, factors={key: (u, s, v)}, **options)
