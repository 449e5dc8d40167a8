"""Fingerprints of base weights, so an adapter is never installed on the wrong model.

An SVFT adapter stores only M; what it means depends on the singular vectors of the exact
base kernels it was trained on. Each adapted kernel is fingerprinted by its shape, dtype
and the SHA-256 of its bytes (C order), which is portable across machines and back-ends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import jax
import numpy as np

from svft_jax._paths import path_to_str
from svft_jax.core._protocol import is_node, is_special


def kernel_fingerprint(kernel) -> dict:
    """{"shape": [...], "dtype": name, "sha256": hex} of one array (host copy, C order)."""
    array = np.asarray(jax.device_get(kernel), order="C")
    return {
        "shape": [int(s) for s in array.shape],
        "dtype": str(array.dtype),
        "sha256": hashlib.sha256(array.reshape(-1).view(np.uint8).data).hexdigest(),
    }


def leaves_by_path(tree) -> dict:
    """{'/'-joined path: leaf} with adapter nodes and `Trainable` markers kept whole."""
    return {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_special)[0]}


def base_fingerprint(adapted, base_params=None) -> dict[str, dict]:
    """Fingerprints of the original kernels behind every adapter node of `adapted`.

    Args:
      adapted: a tree from `svft_jax.apply`.
      base_params: the original params. Needed only for nodes made with keep_base=False,
        whose W0 is not stored (U diag(s) Vᵀ only approximates its bytes).
    Returns:
      {path: fingerprint} for each adapter node, in tree order.
    Raises:
      ValueError if a node has no base and `base_params` lacks that kernel.
    """
    base_leaves = leaves_by_path(base_params) if base_params is not None else {}
    prints = {}
    for path, node in leaves_by_path(adapted).items():
        if not is_node(node):
            continue
        kernel = getattr(node, "base", None)
        kernel = kernel if kernel is not None else base_leaves.get(path)
        if kernel is None:
            raise ValueError(f"target {path!r} was adapted with keep_base=False, so its original kernel is not in the tree; pass base_params=<the original params> so its fingerprint can be computed.")
        if tuple(np.shape(kernel)) != tuple(node.meta.layout.shape):
            raise ValueError(f"base_params[{path!r}] has shape {tuple(np.shape(kernel))}, but the adapted node was made from shape {node.meta.layout.shape}; pass the params the adapter was applied to.")
        prints[path] = kernel_fingerprint(kernel)
    return prints


def verify_fingerprint(expected: Mapping[str, dict], base_params, what: str) -> None:
    """Check that `base_params` holds exactly the kernels `expected` describes.

    Raises:
      ValueError naming the first target whose path is missing or whose shape, dtype or
      checksum differs (a different base model, or a different checkpoint of it).
    """
    leaves = leaves_by_path(base_params)
    for path, want in expected.items():
        if path not in leaves:
            raise ValueError(f"{what} was made for a base model with a parameter {path!r}, which these base_params do not have; load it onto the base model it was trained on.")
        leaf = leaves[path]
        if is_node(leaf):
            raise ValueError(f"base_params[{path!r}] is already an adapter node; pass the original (un-adapted) params.")
        shape, dtype = [int(s) for s in np.shape(leaf)], str(np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype)))
        if shape != list(want["shape"]) or dtype != want["dtype"]:
            raise ValueError(f"{what} does not fit this base model: {path!r} is {tuple(shape)} {dtype} here but {tuple(want['shape'])} {want['dtype']} in the model it was trained on.")
        if kernel_fingerprint(leaf)["sha256"] != want["sha256"]:
            raise ValueError(f"{what} was trained on a different base model: the weights of {path!r} differ (checksum mismatch). SVFT's M is only meaningful with the singular vectors of the exact base weights; load the matching base checkpoint.")
