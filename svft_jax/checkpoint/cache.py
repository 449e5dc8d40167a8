"""Factor stores on disk: the SVD factors (U, s, V) of a model's targets, computed once.

The SVDs are the slow part of `svft_jax.apply` on a large model. A factor store is any Mapping
from `factor_key(matrix, rank, svd_dtype, svd_backend)` (a digest of the kernel's bytes and the
SVD settings) to (u, s, v); `apply(params, ..., factors=store)` reads it before computing an SVD
and writes into it when it is mutable. A file is just another store:

    store = {}
    adapted = svft_jax.apply(params, "banded", d=2, factors=store)     # fills the store
    svft_jax.checkpoint.save_factor_cache("factors.safetensors", store)
    adapted = svft_jax.apply(params, "topk", k=64, factors=load_factor_cache("factors.safetensors"))

Because the key is a digest of the kernel itself, a store can never hand a target the factors
of other weights.
"""

from __future__ import annotations

import pathlib
import warnings
from collections.abc import Iterator, Mapping

import numpy as np

from svft_jax.checkpoint._files import atomic_write, read_safetensors, safetensors_chunks
from svft_jax.checkpoint._records import decode_header, encode_header
from svft_jax.checkpoint.fingerprint import leaves_by_path
from svft_jax.transform._factorize import factor_key
from svft_jax.transform.svft import SVFTNode

CACHE_FORMAT = "svft-jax-factor-store"
_FIELDS = ("u", "s", "v")


def factor_store(adapted, base_params=None) -> dict:
    """A factor store ({key: (u, s, v)}) from the SVFT nodes of an adapted tree.

    Only nodes whose factors are stored losslessly (factor_dtype == svd_dtype) are included;
    a keep_base=False node needs `base_params` for its key (the kernel's bytes).
    """
    base_leaves = leaves_by_path(base_params) if base_params is not None else {}
    store, lossy = {}, []
    for path, node in leaves_by_path(adapted).items():
        if not isinstance(node, SVFTNode):
            continue
        if node.meta.factor_dtype != node.meta.svd_dtype:
            lossy.append(path)
            continue
        kernel = node.base if node.base is not None else base_leaves.get(path)
        if kernel is None:
            raise ValueError(f"factor_store: {path!r} was adapted with keep_base=False; pass base_params= so its key can be computed.")
        key = factor_key(node.layout.to_matrix(np.asarray(kernel)), node.meta.rank, node.meta.svd_dtype, node.meta.svd_backend)
        store[key] = tuple(np.asarray(getattr(node, f)) for f in _FIELDS)
    if lossy:
        warnings.warn(
            f"factor_store: {len(lossy)} target(s) left out (e.g. {lossy[0]!r}): their factors are stored in "
            "another dtype than the SVD computed, so they would not be the factors `apply` looks up. Fill a store "
            "with apply(..., factors=store) instead.", UserWarning, stacklevel=2)
    return store


def save_factor_cache(path, store, *, base_params=None, overwrite: bool = False):
    """Write a factor store (or the factors of an adapted tree) to one safetensors file.

    Args:
      path: destination file; parents are created.
      store: a Mapping {factor key: (u, s, v)} (e.g. the dict `apply(..., factors=store)` filled)
        or an adapted tree (see `factor_store`).
      base_params: for an adapted tree with keep_base=False nodes.
      overwrite: replace an existing file (write-then-rename); otherwise FileExistsError.
    Returns:
      The path written.
    """
    if not _is_store(store):
        store = factor_store(store, base_params)
    if not store:
        raise ValueError("save_factor_cache: no factors to save (pass the store `apply(..., factors=store)` filled, or an adapted tree with SVFT nodes).")
    tensors = {f"{key}::{field}": np.asarray(value) for key, triple in store.items() for field, value in zip(_FIELDS, triple, strict=True)}
    metadata = encode_header(CACHE_FORMAT, {"keys": sorted(store)}, tensors)
    return atomic_write(path, safetensors_chunks(tensors, metadata), overwrite=overwrite, what="factor cache")


def _is_store(tree) -> bool:
    return isinstance(tree, Mapping) and all(isinstance(k, str) and len(k) == 64 and isinstance(v, tuple) for k, v in tree.items())


class FactorFile(Mapping):
    """A read-only factor store backed by a file from `save_factor_cache` (verified on open)."""

    def __init__(self, path):
        tensors, metadata = read_safetensors(path, "factor cache")
        header = decode_header(CACHE_FORMAT, metadata, tensors, f"factor cache {str(path)!r}")
        self._tensors = tensors
        self._keys = tuple(header["keys"])

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return tuple(self._tensors[f"{key}::{field}"] for field in _FIELDS)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class FactorFiles(Mapping):
    """A read-only factor store over several files (the shards a sharded `apply` wrote, one per
    process): the union of their keys. A key in two files names the same kernel and SVD
    settings, so either copy serves."""

    def __init__(self, paths):
        self._files = [FactorFile(p) for p in paths]
        self._where = {}
        for store in self._files:
            for key in store:
                self._where.setdefault(key, store)

    def __getitem__(self, key):
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


SHARD_PATTERN = "factors-{process:05d}-of-{count:05d}.safetensors"


def save_factor_shard(directory, store, *, overwrite: bool = False):
    """Write this process's part of a factor store into `directory` (one file per process).

    After `svft_jax.apply(params, ..., mesh=mesh, factors=store)` each process's `store` holds
    the factors it owns; every process calls this, and `load_factor_cache(directory)` in any
    later run (any process count) reads the union.

    Returns:
      The path written, or None when this process owns no factors.
    """
    import jax

    if not store:
        return None
    name = SHARD_PATTERN.format(process=jax.process_index(), count=jax.process_count())
    return save_factor_cache(pathlib.Path(directory) / name, store, overwrite=overwrite)


def load_factor_cache(path) -> Mapping:
    """The factor store in `path`: pass it as `factors=` to `svft_jax.apply` or `load_adapter`.

    Args:
      path: a file from `save_factor_cache`, a directory of such files (e.g. the shards of
        `save_factor_shard`, read as one store), or a list of files.
    Raises:
      FileNotFoundError; ValueError for a corrupted, foreign or other-version file, or a
      directory with no factor files.
    """
    if isinstance(path, list | tuple):
        return FactorFiles(path)
    if pathlib.Path(path).is_dir():
        files = sorted(pathlib.Path(path).glob("*.safetensors"))
        if not files:
            raise ValueError(f"load_factor_cache: directory {str(path)!r} holds no .safetensors factor files.")
        return FactorFiles(files)
    return FactorFile(path)
