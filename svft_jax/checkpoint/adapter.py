"""Adapter files: the trained part of an adapted model — kilobytes, not the model — for any
adapter method (SVFT, LoRA, DoRA, VeRA, a mix, or a new protocol method).

File format (one safetensors file, written atomically), version 2:
  tensors   "<target path>::<field>"   each trainable array of the node (SVFT: m, gate;
                                        LoRA: a, b; DoRA: magnitude, a, b; VeRA: scale_d, scale_b)
            "<target path>::sketch"    Q ΔW P on seeded probes (*stack, 4, 4) float64: a
                                        fingerprint of the update the node makes
            "<target path>::rows|cols" SVFT's Ω as saved (uint16, int32 if r > 65535)
            "extra::<leaf path>"       leaves trained in full (the tree's `Trainable` markers)
  metadata  "svft_jax": JSON {format: "svft-jax-adapter", version, targets: [each node's
            `config()` — method, options, layout, dtypes, SVD back-end and dtype, Ω digest —
            plus the base kernel's fingerprint], extras}; "svft_jax_sha256": checksum of that
            JSON and every tensor.

Loading re-creates every node through the method's one constructor with the recorded config
(the SVD back-end that made the factors included), checks that it reproduces the recorded
config (Ω included) and, after installing the trained arrays, that its ΔW matches the sketch —
so an adapter never silently means another update (e.g. on a degenerate spectrum, where two SVD
routines return different singular vectors).

Why safetensors, not an Orbax directory: an adapter is small, so one file is simplest to copy,
and a file rename is atomic where a directory swap is not; safetensors stores no code and is
what PEFT adapters use, so non-JAX tools can inspect it.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax._paths import path_to_str
from svft_jax.checkpoint._files import atomic_write, read_safetensors, safetensors_chunks
from svft_jax.checkpoint._records import decode_header, encode_header
from svft_jax.checkpoint.cache import as_factor_store
from svft_jax.checkpoint.fingerprint import base_fingerprint, leaves_by_path, verify_fingerprint
from svft_jax.core._merge import check_whole
from svft_jax.core._partition import extra_paths
from svft_jax.core._protocol import METHODS, Record, Trainable, is_node, is_special

ADAPTER_FORMAT = "svft-jax-adapter"
_EXTRA_PREFIX = "extra::"


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def save_adapter(path, adapted, *, extra: str | None = None, base_params=None, overwrite: bool = False):
    """Write the trained part of an adapted model to one small file.

    Args:
      path: destination file (e.g. "adapter.safetensors"); parent folders are created.
      adapted: the whole adapted tree (`apply`'s output, or `svft_jax.combine(trainable, frozen)`),
        with nodes of any method.
      extra: for trees without `Trainable` markers only: regex of leaves trained in full to
        store too (a marked tree stores its marked leaves; a conflicting regex raises).
      base_params: the original params; needed only if some SVFT target used keep_base=False
        (its W0 is then not in the tree, and the fingerprint needs its exact bytes).
      overwrite: replace an existing file (write-then-rename); otherwise FileExistsError.
    Returns:
      The path written, as a `pathlib.Path`.
    Raises:
      ValueError/TypeError before anything is written: a tree without adapter nodes, one half
      of `split` (combine first), a bad `extra`; FileExistsError; OSError (disk full, ...).
    """
    check_whole(adapted, "save_adapter")
    leaves = leaves_by_path(adapted)
    nodes = {p: x for p, x in leaves.items() if is_node(x)}
    if not nodes:
        raise ValueError("save_adapter: `adapted` has no adapter nodes; pass the output of svft_jax.apply (or a baseline's apply).")
    extras = sorted(extra_paths(adapted, extra, "save_adapter"))
    prints = base_fingerprint(adapted, base_params)
    tensors, configs = {}, []
    for target, node in nodes.items():
        record = node.record()
        configs.append({**record.config, "base": prints[target]})
        for name, array in record.arrays.items():
            tensors[f"{target}::{name}"] = array
        tensors[f"{target}::sketch"] = record.sketch
        for name, array in node.file_tensors().items():  # what the method stores besides (SVFT: Ω)
            tensors[f"{target}::{name}"] = array
    for p in extras:
        leaf = leaves[p]
        tensors[_EXTRA_PREFIX + p] = _host(leaf.value if isinstance(leaf, Trainable) else leaf)
    metadata = encode_header(ADAPTER_FORMAT, {"targets": configs, "extras": extras}, tensors)
    return atomic_write(path, safetensors_chunks(tensors, metadata), overwrite=overwrite, what="adapter")


@dataclasses.dataclass(frozen=True)
class AdapterFile:
    """A verified adapter file: its header (`targets` configs, `extras`) and tensors."""

    header: dict
    tensors: dict

    @property
    def targets(self) -> list[dict]:
        return self.header["targets"]

    def record(self, config: dict) -> Record:
        """The protocol `Record` of one target of this file."""
        path = config["path"]
        node_cls = METHODS.get(config["method"])
        prefix = f"{path}::"
        arrays = {name: self.tensors[prefix + name] for name in node_cls.trainable_fields() if prefix + name in self.tensors}
        plan_config = {k: v for k, v in config.items() if k != "base"}
        return Record(plan_config, arrays, self.tensors[prefix + "sketch"])


def read_adapter(path) -> AdapterFile:
    """Read and verify (format, version, checksum) an adapter file without a base model.

    Raises:
      FileNotFoundError; ValueError for a truncated, corrupted, foreign or other-version file.
    """
    tensors, metadata = read_safetensors(path, "adapter file")
    header = decode_header(ADAPTER_FORMAT, metadata, tensors, f"adapter file {str(path)!r}")
    return AdapterFile(header, tensors)


def load_adapter(path, base_params, *, factors=None, svd_backend: str | None = None):
    """Re-create a trained adapted model from a base model and an adapter file.

    Verifies the file (format version, checksum) and that `base_params` holds exactly the
    kernels the adapter was trained on (shape, dtype, SHA-256); re-creates each node with its
    recorded configuration — SVD back-end and dtype included — through the method's one
    constructor (factors from the `factors` store when given); checks the recomputed Ω and the
    update ΔW (seeded probes) against the file; installs the trained arrays and the extras.

    Args:
      path: an adapter file from `save_adapter`.
      base_params: the original (un-adapted) params of the base model.
      factors: a factor store (e.g. `svft_jax.checkpoint.load_factor_cache(path)`, or a path to
        such a file) to skip the SVDs.
      svd_backend: recompute the factors with another routine ("numpy" or "jax") than the one
        recorded; the probe check still refuses a target whose update then changes.
    Returns:
      The adapted tree, `Trainable` markers on the extras, ready for `merge` or `split`.
    Raises:
      ValueError for a different base model, a corrupted/truncated/foreign file, an unknown
      version, a pattern or update that the base does not reproduce — before anything is returned.
    """
    where = f"adapter file {str(path)!r}"
    adapter = read_adapter(path)
    verify_fingerprint({c["path"]: c["base"] for c in adapter.targets}, base_params, where)
    factors = as_factor_store(os.fsdecode(factors) if isinstance(factors, bytes) else factors, "load_adapter")
    base_leaves = leaves_by_path(base_params)
    extras = adapter.header["extras"]
    missing = [p for p in extras if p not in base_leaves]
    if missing:
        raise ValueError(f"{where}: base_params have no parameter {missing[0]!r}, which the adapter trained in full.")
    by_method: dict[str, list[Record]] = {}
    for config in adapter.targets:
        record = adapter.record(config)
        if svd_backend is not None and "svd_backend" in record.config:
            record = dataclasses.replace(record, config={**record.config, "svd_backend": svd_backend})
        by_method.setdefault(config["method"], []).append(record)
    nodes = {}
    for method, records in by_method.items():
        nodes.update(METHODS.get(method).from_records(records, base_leaves, factors=factors, where=where))
    for p in extras:
        value, leaf = adapter.tensors[_EXTRA_PREFIX + p], base_leaves[p]
        if tuple(value.shape) != tuple(np.shape(leaf)):
            raise ValueError(f"{where}: extra leaf {p!r} has shape {value.shape} in the file but {tuple(np.shape(leaf))} in base_params.")
        nodes[p] = Trainable(jnp.asarray(value, dtype=getattr(leaf, "dtype", value.dtype)))
    return jax.tree_util.tree_map_with_path(lambda p, x: nodes.get(path_to_str(p), x), base_params, is_leaf=is_special)
