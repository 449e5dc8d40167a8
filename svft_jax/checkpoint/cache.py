"""Factor cache: the SVD factors (U, s, V) and Ω of an adapted model, keyed by the base.

The SVDs are the slow part of `svft_jax.apply` on a large model (minutes for a 7B model on
CPU). A cache stores them once; `load_factor_cache(path, base_params)` returns the adapted
tree without any SVD, after checking (shape, dtype, SHA-256 per target) that `base_params`
are the weights the factors came from. Same safetensors container as the adapter file.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from svft_jax._paths import path_to_str
from svft_jax.checkpoint._files import atomic_write, read_safetensors, safetensors_chunks
from svft_jax.checkpoint._records import (
    decode_header,
    encode_header,
    node_from_record,
    target_record,
)
from svft_jax.checkpoint.fingerprint import base_fingerprint, leaves_by_path, verify_fingerprint
from svft_jax.transform.node import SVFTNode, is_node

CACHE_FORMAT = "svft-jax-factor-cache"
# Config that decides the factors and Ω; m/gate initial values may differ (they are replaced).
_FACTOR_KEYS = ("pattern", "d", "k", "seed", "rank", "factor_dtype", "layout", "keep_base", "base")


def save_factor_cache(path, adapted, *, base_params=None, overwrite: bool = False):
    """Store the factors, Ω and initial m/gate of every SVFT node in `adapted`.

    Args:
      path: destination file; parents are created.
      adapted: output of `svft_jax.apply`.
      base_params: the original params, needed only for keep_base=False nodes (fingerprint).
      overwrite: replace an existing cache (write-then-rename); otherwise FileExistsError.
    Returns:
      The path written.
    """
    nodes = {p: x for p, x in leaves_by_path(adapted).items() if isinstance(x, SVFTNode)}
    if not nodes:
        raise ValueError("save_factor_cache: `adapted` has no SVFT nodes; pass the output of svft_jax.apply.")
    prints = base_fingerprint(adapted, base_params)
    tensors, records = {}, []
    for target, node in nodes.items():
        records.append(target_record(node, prints[target]))
        for field in ("u", "s", "v", "m", "gate"):
            value = getattr(node, field)
            if value is not None:
                tensors[f"{target}::{field}"] = np.asarray(jax.device_get(value))
        tensors[f"{target}::rows"] = node.meta.rows.array
        tensors[f"{target}::cols"] = node.meta.cols.array
    metadata = encode_header(CACHE_FORMAT, {"targets": records}, tensors)
    return atomic_write(path, safetensors_chunks(tensors, metadata), overwrite=overwrite, what="factor cache")


def load_factor_cache(path, base_params):
    """The adapted tree of `base_params`, rebuilt from a cache without running any SVD.

    Args:
      path: a file from `save_factor_cache`.
      base_params: the original params; each cached target's kernel must match the
        fingerprint stored in the cache.
    Returns:
      The tree `svft_jax.apply` would return for the cached config.
    Raises:
      ValueError for a different base model or a corrupted/foreign/newer file.
    """
    where = f"factor cache {str(path)!r}"
    tensors, metadata = read_safetensors(path, "factor cache")
    header = decode_header(CACHE_FORMAT, metadata, tensors, where)
    records = header["targets"]
    verify_fingerprint({r["path"]: r["base"] for r in records}, base_params, where)
    nodes = {}
    base_leaves = leaves_by_path(base_params)
    for record in records:
        path = record["path"]
        nodes[path] = node_from_record(
            record, **{f: tensors.get(f"{path}::{f}") for f in ("u", "s", "v", "rows", "cols", "m", "gate")},
            base=base_leaves[path] if record["keep_base"] else None,
        )
    return jax.tree_util.tree_map_with_path(lambda p, leaf: nodes.get(path_to_str(p), leaf), base_params)


def adapted_from_factors(factors, base_params, records: list[dict]):
    """The adapted tree for `records` (an adapter's targets) from a cache path or an adapted tree.

    Raises ValueError if the cache lacks a target or was made with another pattern/rank/
    dtype/layout (then its factors or Ω do not belong to the adapter).
    """
    is_path = isinstance(factors, str | bytes) or hasattr(factors, "__fspath__")
    adapted = load_factor_cache(factors, base_params) if is_path else factors
    wanted = {r["path"] for r in records}
    cached = {p: x for p, x in leaves_by_path(adapted).items() if isinstance(x, SVFTNode) and p in wanted}
    actual_prints = base_fingerprint(cached, base_params)
    for record in records:
        node = cached.get(record["path"])
        if node is None:
            raise ValueError(f"the factor cache has no SVFT node for {record['path']!r}, which the adapter needs; build the cache with the adapter's targets.")
        have = target_record(node, actual_prints[record["path"]])
        diff = [key for key in _FACTOR_KEYS if _normalise(have[key]) != _normalise(record[key])]
        if diff:
            raise ValueError(f"the factor cache's node {record['path']!r} differs from the adapter in {diff}: cache {[have[k] for k in diff]} vs adapter {[record[k] for k in diff]}.")
    # Targets the cache has but the adapter does not go back to their base kernels.
    base_leaves = leaves_by_path(base_params)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if not is_node(x) or path_to_str(p) in wanted else base_leaves[path_to_str(p)],
        adapted, is_leaf=is_node,
    )


def _normalise(value):
    if isinstance(value, Mapping):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_normalise(v) for v in value]
    return value
