"""Adapter export: M (and gates), the pattern Ω and the config — kilobytes, not the model.

File format (one safetensors file, written atomically):
  tensors   "<target path>::m"      (*stack, |Ω|) float32
            "<target path>::gate"   (*stack,) float32, init="reference" only
            "<target path>::rows"   (|Ω|,) or (*stack, |Ω|) uint16 (int32 if r > 65535), the saved Ω
            "<target path>::cols"   same
            "extra::<leaf path>"    fully-trainable extra leaves (e.g. a new classifier head)
  metadata  "svft_jax": JSON {format: "svft-jax-adapter", version, targets: [per-target config
            and base fingerprint], extras, svd_dtype}; "svft_jax_sha256": checksum of
            that JSON and every tensor.

Why safetensors, not an Orbax directory: an adapter is small, so one file is simplest to
copy, and a file rename is atomic where a directory swap is not; safetensors stores no
code (unlike pickle), carries a string header for the config, and is what PEFT adapters
use, so non-JAX tools can inspect it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax._paths import compile_regex, matches, path_to_str
from svft_jax.checkpoint._files import atomic_write, read_safetensors, safetensors_chunks
from svft_jax.checkpoint._records import (
    apply_from_records,
    decode_header,
    encode_header,
    target_record,
)
from svft_jax.checkpoint.fingerprint import base_fingerprint, leaves_by_path, verify_fingerprint
from svft_jax.transform.node import SVFTNode, is_node

ADAPTER_FORMAT = "svft-jax-adapter"
_EXTRA_PREFIX = "extra::"


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def save_adapter(path, adapted, *, extra: str | None = None, base_params=None,
                 svd_dtype: str = "float32", svd_backend: str = "jax", overwrite: bool = False):
    """Write the trained part of an SVFT model to one small file.

    Args:
      path: destination file (e.g. "adapter.safetensors"); parent folders are created.
      adapted: the adapted tree (`svft_jax.combine(trainable, frozen)` or `apply`'s output).
      extra: regex of extra fully-trainable leaves to store too (as in `svft_jax.split`),
        e.g. 'classifier/.*' for a new head.
      base_params: the original params; needed only if some target used keep_base=False
        (its W0 is then not in the tree, and the fingerprint needs its exact bytes).
      svd_dtype, svd_backend: the SVD settings given to `apply` (the nodes do not record
        them); `load_adapter` repeats them by default, which reproduces the factors bit for
        bit on the same platform. Another back-end gives the same update to float precision.
      overwrite: replace an existing file (write-then-rename); otherwise FileExistsError.
    Returns:
      The path written, as a `pathlib.Path`.
    Raises:
      ValueError/TypeError before anything is written for a tree without SVFT nodes, a
      non-SVFT adapter node, or a bad `extra`; FileExistsError; OSError (disk full, ...).
    """
    extra_re = compile_regex(extra, "extra")
    leaves = leaves_by_path(adapted)
    nodes = {p: x for p, x in leaves.items() if is_node(x)}
    others = [p for p, x in nodes.items() if not isinstance(x, SVFTNode)]
    if others:
        raise TypeError(f"save_adapter stores SVFT nodes; {others[0]!r} is a {type(nodes[others[0]]).__name__}. Save baselines with svft_jax.checkpoint.save_merged or orbax.")
    if not nodes:
        raise ValueError("save_adapter: `adapted` has no SVFT nodes; pass the output of svft_jax.apply (or combine(trainable, frozen)).")
    prints = base_fingerprint(adapted, base_params)
    tensors, records = {}, []
    for target, node in nodes.items():
        records.append(target_record(node, prints[target]))
        tensors[f"{target}::m"] = _host(node.m).astype(np.float32)
        if node.gate is not None:
            tensors[f"{target}::gate"] = _host(node.gate).astype(np.float32)
        # Indices are < r, so uint16 nearly always fits: Ω would otherwise be 2/3 of the file.
        index_dtype = np.uint16 if node.meta.rank <= np.iinfo(np.uint16).max else np.int32
        tensors[f"{target}::rows"] = node.meta.rows.array.astype(index_dtype)
        tensors[f"{target}::cols"] = node.meta.cols.array.astype(index_dtype)
    extras = [p for p, x in leaves.items() if not is_node(x) and x is not None and matches(extra_re, p)]
    if extra is not None and not extras:
        raise ValueError(f"extra={extra!r} matched no leaf outside the SVFT nodes; paths are '/'-joined, e.g. {list(leaves)[:4]}.")
    for p in extras:
        tensors[_EXTRA_PREFIX + p] = _host(leaves[p])
    metadata = encode_header(ADAPTER_FORMAT, {"targets": records, "extras": extras, "svd_dtype": svd_dtype, "svd_backend": svd_backend}, tensors)
    return atomic_write(path, safetensors_chunks(tensors, metadata), overwrite=overwrite, what="adapter")


@dataclasses.dataclass(frozen=True)
class AdapterFile:
    """A verified adapter file: its header (`targets` records, `extras`) and tensors."""

    header: dict
    tensors: dict

    @property
    def targets(self) -> list[dict]:
        return self.header["targets"]


def read_adapter(path) -> AdapterFile:
    """Read and verify (format, version, checksum) an adapter file without a base model.

    Raises:
      FileNotFoundError; ValueError for a truncated, corrupted, foreign or newer-version file.
    """
    tensors, metadata = read_safetensors(path, "adapter file")
    header = decode_header(ADAPTER_FORMAT, metadata, tensors, f"adapter file {str(path)!r}")
    return AdapterFile(header, tensors)


def _install(adapted, adapter: AdapterFile, where: str):
    """Replace m/gate (and extras) in `adapted` by the saved values, checking Ω and shapes."""
    records = {r["path"]: r for r in adapter.targets}
    tensors = adapter.tensors
    extras = set(adapter.header["extras"])

    def install(path_keys, leaf):
        path = path_to_str(path_keys)
        if is_node(leaf) and path in records:
            rows, cols = tensors[f"{path}::rows"], tensors[f"{path}::cols"]
            if not (np.array_equal(rows, leaf.meta.rows.array) and np.array_equal(cols, leaf.meta.cols.array)):
                raise ValueError(f"{where}: the pattern Ω recomputed for {path!r} differs from the saved one (pattern {leaf.meta.pattern!r}). Top-k patterns depend on the factors, so the base weights or the SVD settings (svd_dtype) differ from training; nothing was loaded.")
            m = tensors[f"{path}::m"]
            if m.shape != tuple(leaf.m.shape):
                raise ValueError(f"{where}: m for {path!r} has shape {m.shape}, the re-created node expects {tuple(leaf.m.shape)}.")
            gate = tensors.get(f"{path}::gate")
            if (gate is None) != (leaf.gate is None):
                raise ValueError(f"{where}: {path!r} gate presence differs between the file and the re-created node (init setting).")
            return dataclasses.replace(leaf, m=jnp.asarray(m), gate=None if gate is None else jnp.asarray(gate))
        if path in extras:
            value = tensors[_EXTRA_PREFIX + path]
            if tuple(value.shape) != tuple(np.shape(leaf)):
                raise ValueError(f"{where}: extra leaf {path!r} has shape {value.shape} in the file but {tuple(np.shape(leaf))} in base_params.")
            return jnp.asarray(value, dtype=getattr(leaf, "dtype", value.dtype))
        return leaf

    present = leaves_by_path(adapted)
    missing = [p for p in [*records, *extras] if p not in present]
    if missing:
        raise ValueError(f"{where}: base_params have no parameter {missing[0]!r}, which the adapter needs.")
    return jax.tree_util.tree_map_with_path(install, adapted, is_leaf=is_node)


def load_adapter(path, base_params, *, factors=None, svd_backend: str | None = None, svd_dtype: str | None = None):
    """Re-create a trained SVFT model from a base model and an adapter file.

    Verifies the file (format version, checksum), verifies that `base_params` holds exactly
    the kernels the adapter was trained on (shape, dtype, SHA-256), re-runs `svft_jax.apply`
    with the saved per-target config (or takes the factors from a cache), checks that the
    recomputed pattern Ω equals the saved one, and installs the saved M.

    Args:
      path: an adapter file from `save_adapter`.
      base_params: the original (un-adapted) params of the base model.
      factors: optional factor cache (a path from `save_factor_cache`, or an adapted tree
        of the same base) to skip the SVDs.
      svd_backend: override the recorded back-end ("jax" or "numpy"); thanks to canonical
        singular-vector signs the update is the same to float precision.
      svd_dtype: override the recorded `svd_dtype` ("float32"/"float64").
    Returns:
      The adapted tree (SVFT nodes with the trained m), ready for `svft_jax.merge` or
      `svft_jax.split` to continue training.
    Raises:
      ValueError for a different base model, a corrupted/truncated/foreign file, an unknown
      version, or a pattern mismatch — all before anything is returned.
    """
    where = f"adapter file {str(path)!r}"
    adapter = read_adapter(path)
    expected = {r["path"]: r["base"] for r in adapter.targets}
    verify_fingerprint(expected, base_params, where)
    if factors is None:
        adapted = apply_from_records(base_params, adapter.targets,
                                     svd_backend=svd_backend or adapter.header["svd_backend"],
                                     svd_dtype=svd_dtype or adapter.header["svd_dtype"])
    else:
        from svft_jax.checkpoint.cache import adapted_from_factors

        adapted = adapted_from_factors(factors, base_params, adapter.targets)
    return _install(adapted, adapter, where)
