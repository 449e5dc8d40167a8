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
of other weights by accident; and every entry `apply` reads is checked against its kernel
(shapes, rank, dtype, and that it is the kernel's SVD on seeded probes), so an edited or
foreign store is refused, naming the target and the file.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from collections.abc import Iterator, Mapping

import numpy as np

from svft_jax.checkpoint._files import atomic_write, read_safetensors, safetensors_chunks
from svft_jax.checkpoint._records import decode_header, encode_header
from svft_jax.checkpoint.fingerprint import leaves_by_path
from svft_jax.core._protocol import is_node

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
        if not (is_node(node) and node.has_factors):
            continue
        if not node.factors_lossless:
            lossy.append(path)
            continue
        kernel = node.base if node.base is not None else base_leaves.get(path)
        if kernel is None:
            raise ValueError(f"factor_store: {path!r} was adapted with keep_base=False; pass base_params= so its key can be computed.")
        key, factors = node.factor_cache_entry(kernel)
        store[key] = factors
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
        self.path = pathlib.Path(path)
        self._tensors = tensors
        self._keys = tuple(header["keys"])

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return tuple(self._tensors[f"{key}::{field}"] for field in _FIELDS)

    def source(self, key=None) -> str:
        """Names this store in error messages (`apply` refuses a wrong entry naming its file)."""
        return f"factor cache {str(self.path)!r}"

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class FactorFiles(Mapping):
    """A read-only factor store over several files (the shards a sharded `apply` wrote, one per
    process): the union of their keys. A key in two files names the same kernel and SVD
    settings, so both must hold the same factors (to the SVD's rounding: two machines' LAPACKs
    may differ in the last bits); files that disagree are refused on open, naming both."""

    def __init__(self, paths):
        self._files = [FactorFile(p) for p in paths]
        self._where = {}
        for store in self._files:
            for key in store:
                first = self._where.setdefault(key, store)
                if first is not store:
                    _check_same_factors(key, first, store)

    def __getitem__(self, key):
        return self._where[key][key]

    def source(self, key=None) -> str:
        """Names the file that holds `key` (all files when it is in none)."""
        if key in self._where:
            return self._where[key].source()
        return "factor caches " + ", ".join(repr(str(f.path)) for f in self._files)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _check_same_factors(key: str, first: FactorFile, second: FactorFile) -> None:
    """Refuse two cache files whose entries for one key differ beyond float rounding."""
    a, b = first[key], second[key]
    same = True
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape or x.dtype != y.dtype:
            same = False
            break
        if np.array_equal(x, y):
            continue
        x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        eps = float(np.finfo(x.dtype).eps) if np.issubdtype(x.dtype, np.floating) else 0.0
        scale = max(float(np.max(np.abs(x64), initial=0.0)), np.finfo(np.float64).tiny)
        if not float(np.max(np.abs(x64 - y64), initial=0.0)) <= 1e3 * eps * scale:
            same = False
            break
    if not same:
        raise ValueError(
            f"factor caches {str(first.path)!r} and {str(second.path)!r} both hold key {key[:12]}… (the same kernel and "
            "SVD settings) but with different factors, so which file is read first would decide the model. Remove the "
            "file that was not made from this model's kernels, or rebuild the cache.")


def as_factor_store(factors, caller: str):
    """`factors=` as a store: None, a Mapping (used as is), or a path (str or os.PathLike) to
    a factor cache file or folder, read with `load_factor_cache`.

    Raises:
      TypeError naming `caller` for anything else (a str is a path, never a store).
    """
    if factors is None or isinstance(factors, Mapping):
        return factors
    if isinstance(factors, str | os.PathLike):
        return load_factor_cache(factors)
    raise TypeError(f"{caller}: `factors` must be a factor store (a Mapping from factor_key to (u, s, v)) or the path "
                    f"of a factor cache (str or os.PathLike), got {type(factors).__name__}.")


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
      FileNotFoundError; ValueError for a corrupted, foreign or other-version file, a
      directory with no factor files, or two files with different factors for one key.
    """
    if isinstance(path, list | tuple):
        return FactorFiles(path)
    if pathlib.Path(path).is_dir():
        files = sorted(pathlib.Path(path).glob("*.safetensors"))
        if not files:
            raise ValueError(f"load_factor_cache: directory {str(path)!r} holds no .safetensors factor files.")
        return FactorFiles(files)
    return FactorFile(path)
