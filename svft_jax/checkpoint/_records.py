"""What the adapter and factor-cache files share: per-target config records, a versioned
JSON header with a checksum over header and tensors, and rebuilding nodes from records."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from svft_jax.patterns import PatternOptions
from svft_jax.transform.apply import apply
from svft_jax.transform.layout import KernelLayout
from svft_jax.transform.node import StaticIndices, SVFTMeta, SVFTNode

FORMAT_VERSION = 1
_HEADER_KEY = "svft_jax"
_CHECKSUM_KEY = "svft_jax_sha256"


def target_record(node: SVFTNode, fingerprint: dict) -> dict:
    """The JSON-able config that re-creates `node` with `svft_jax.apply`, plus its base fingerprint."""
    meta = node.meta
    layout = meta.layout
    return {
        "path": meta.path,
        "pattern": meta.pattern,
        "d": meta.options.d,
        "k": meta.options.k,
        "seed": meta.options.seed,
        "rank": meta.rank,
        "init": meta.init,
        "factor_dtype": meta.factor_dtype,
        "keep_base": node.base is not None,
        "layout": {"shape": list(layout.shape), "dtype": layout.dtype, "stack_ndim": layout.stack_ndim,
                   "in_axes": list(layout.in_axes), "out_axes": list(layout.out_axes)},
        "num_entries": meta.num_entries,
        "gate": node.gate is not None,
        "base": fingerprint,
    }


def _checksum(header_json: str, tensors: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256(header_json.encode())
    for name in sorted(tensors):
        array = np.asarray(tensors[name], order="C")
        digest.update(f"{name}|{array.dtype.name}|{array.shape}".encode())
        digest.update(array.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def encode_header(kind: str, payload: dict, tensors: Mapping[str, np.ndarray]) -> dict[str, str]:
    """safetensors `__metadata__` for a file of `kind`: the JSON payload and its checksum."""
    from svft_jax import __version__

    header_json = json.dumps({"format": kind, "version": FORMAT_VERSION, "library": f"svft-jax {__version__}", **payload},
                             sort_keys=True)
    return {_HEADER_KEY: header_json, _CHECKSUM_KEY: _checksum(header_json, tensors), "format": "svft-jax"}


def decode_header(kind: str, metadata: Mapping[str, str], tensors: Mapping[str, np.ndarray], where: str) -> dict:
    """Parse and verify a header written by `encode_header`.

    Raises:
      ValueError: not a `kind` file, an unknown format version, or a checksum mismatch
        (the file was modified or corrupted after it was written).
    """
    if _HEADER_KEY not in metadata:
        raise ValueError(f"{where} is not an svft-jax {kind} (no '{_HEADER_KEY}' header); was it written by svft_jax.checkpoint?")
    try:
        header = json.loads(metadata[_HEADER_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is corrupted: its svft-jax header is not valid JSON ({err}).") from err
    if not isinstance(header, dict) or header.get("format") != kind:
        found = header.get("format") if isinstance(header, dict) else None
        raise ValueError(f"{where} is a {found!r} file, not an svft-jax {kind}.")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{where} has {kind} format version {header.get('version')!r}; this svft-jax reads version {FORMAT_VERSION}. Upgrade svft-jax (or re-export the file with this version).")
    if metadata.get(_CHECKSUM_KEY) != _checksum(metadata[_HEADER_KEY], tensors):
        raise ValueError(f"{where} is corrupted: its checksum does not match its contents (modified or damaged after it was written).")
    return header


def layout_of(record: dict) -> KernelLayout:
    spec = record["layout"]
    return KernelLayout(tuple(spec["shape"]), spec["dtype"], int(spec["stack_ndim"]),
                        tuple(spec["in_axes"]), tuple(spec["out_axes"]))


def apply_from_records(base_params, records: list[dict], *, svd_backend: str, svd_dtype: str):
    """Re-run `svft_jax.apply` on `base_params` with exactly the per-target configs saved."""
    overrides = {
        re.escape(r["path"]): {
            "pattern": r["pattern"], "d": r["d"], "k": r["k"], "seed": r["seed"], "rank": r["rank"],
            "init": r["init"], "factor_dtype": r["factor_dtype"], "keep_base": r["keep_base"],
            "layout": {key: r["layout"][key] for key in ("stack_ndim", "in_axes", "out_axes")},
        }
        for r in records
    }
    return apply(
        base_params, records[0]["pattern"], targets="|".join(overrides), overrides=overrides,
        svd_backend=svd_backend, svd_dtype=svd_dtype,
    )


def node_from_record(record: dict, *, u, s, v, rows, cols, m, gate, base) -> SVFTNode:
    """An SVFTNode from stored arrays (the factor cache's way in, no SVD)."""
    meta = SVFTMeta(
        path=record["path"], pattern=record["pattern"],
        options=PatternOptions(d=record["d"], k=record["k"], seed=record["seed"]),
        rank=int(record["rank"]), layout=layout_of(record), rows=StaticIndices(rows),
        cols=StaticIndices(cols), init=record["init"], factor_dtype=record["factor_dtype"],
    )
    dtype = jnp.dtype(record["factor_dtype"])
    return SVFTNode(
        u=jnp.asarray(u, dtype), s=jnp.asarray(s, dtype), v=jnp.asarray(v, dtype),
        m=jnp.asarray(m, jnp.float32), gate=None if gate is None else jnp.asarray(gate, jnp.float32),
        base=base, meta=meta,
    )
