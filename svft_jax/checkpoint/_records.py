"""What the adapter and factor-cache files share: a versioned JSON header with a checksum over
header and tensors. (Nodes are rebuilt from their recorded configs by the protocol's one
constructor, `AdapterNode.from_records`.)"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np

# 2: per-target configs of any adapter method (the protocol's `config()`), SVD settings recorded
# per target, and a probe sketch of each ΔW. Version-1 files (SVFT only) are refused.
FORMAT_VERSION = 2
_HEADER_KEY = "svft_jax"
_CHECKSUM_KEY = "svft_jax_sha256"


def _checksum(header_json: str, tensors: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256(header_json.encode())
    for name in sorted(tensors):
        array = np.asarray(tensors[name], order="C")
        digest.update(f"{name}|{array.dtype.name}|{array.shape}".encode())
        digest.update(array.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def encode_header(kind: str, payload: dict, tensors: Mapping[str, np.ndarray]) -> dict[str, str]:
    """safetensors `__metadata__` for a file of `kind`: the JSON payload and its checksum."""
    from svft_jax._version import __version__

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
