"""Merged export: W = W0 + U M Vᵀ folded into plain dense params the unmodified model loads.

Two containers:
  * `save_merged` — an Orbax (StandardCheckpointer) directory of the dense pytree, for JAX
    users: `load_merged(path)` or `ocp.StandardCheckpointer().restore(path)`.
  * `save_merged_safetensors` — one safetensors file with flattened names, for everything
    else. With sep="." and a Hugging Face Flax model's `params`, the file is exactly what
    `FlaxPreTrainedModel.save_pretrained(..., safe_serialization=True)` writes, so
    `FlaxXxxModel.from_pretrained(dir)` reads it (put it next to the model's config.json as
    `model.safetensors`). Kernels keep Flax's (in, out) layout.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from svft_jax._paths import key_to_str
from svft_jax.checkpoint._files import (
    atomic_write,
    ensure_directory,
    read_safetensors,
    safetensors_chunks,
)
from svft_jax.transform import merge


def merged_params(adapted):
    """`svft_jax.merge(adapted)` as host numpy arrays (what the exporters write).

    Jitted: one compilation of the whole merge is several times faster than running its
    many small ops eagerly (each compiles on first use).
    """
    try:
        return jax.device_get(_jit_merge(adapted))
    except TypeError:  # a non-array leaf (e.g. a string) cannot enter jit: merge eagerly
        return jax.device_get(merge(adapted))


_jit_merge = jax.jit(merge)


def save_merged(path, adapted, *, overwrite: bool = False) -> Path:
    """Write the merged dense params as an Orbax checkpoint directory.

    Orbax writes into a temporary directory and renames it, so a crash leaves no partial
    checkpoint at `path`. With overwrite=True the new checkpoint is complete before the old
    one is moved aside and deleted.

    Args:
      path: destination directory (must not exist unless overwrite=True).
      adapted: an adapted tree (SVFT or baseline nodes) or plain params.
      overwrite: replace an existing export.
    Returns:
      The absolute path written.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"merged export {str(path)!r} already exists; pass overwrite=True to replace it.")
    ensure_directory(path.parent, "the merged export")
    params = merged_params(adapted)
    staging = path.with_name(f".{path.name}.new-{uuid.uuid4().hex[:8]}") if path.exists() else path
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(staging, params)
        checkpointer.wait_until_finished()
    except OSError as err:
        raise OSError(err.errno, f"could not write the merged export to {str(path)!r}: {err.strerror or err}; an existing export is unchanged.") from err
    finally:
        checkpointer.close()
    if staging != path:
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(path, old)
        os.rename(staging, path)
        shutil.rmtree(old)
    return path


def load_merged(path, template=None):
    """Restore params written by `save_merged` (optionally into `template`'s structure/shardings)."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"no merged export at {str(path)!r}.")
    with ocp.StandardCheckpointer() as checkpointer:
        if template is None:
            return checkpointer.restore(path)
        return checkpointer.restore(path, jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template))


def flatten_params(params, sep: str = ".") -> dict[str, np.ndarray]:
    """{joined path: numpy array}. Raises ValueError if a key contains `sep` (ambiguous names)."""
    flat = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = [key_to_str(k) for k in keys]
        if any(sep in p for p in parts):
            raise ValueError(f"parameter {parts} has a key containing {sep!r}, so joined names would be ambiguous; choose another sep.")
        flat[sep.join(parts)] = np.asarray(leaf)
    return flat


def unflatten_params(flat: dict, sep: str = ".") -> dict:
    """The nested dict of `flatten_params`'s output."""
    nested: dict = {}
    for name in sorted(flat):
        *parents, last = name.split(sep)
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = flat[name]
    return nested


def save_merged_safetensors(path, adapted, *, sep: str = ".", overwrite: bool = False) -> Path:
    """Write the merged dense params as one safetensors file with flattened names.

    Args:
      path: destination file (e.g. "model.safetensors").
      adapted: an adapted tree or plain params (nested dicts).
      sep: "." (Hugging Face Flax naming, readable by `from_pretrained`) or "/".
      overwrite: replace an existing file (write-then-rename).
    Returns:
      The path written.
    """
    if sep not in (".", "/"):
        raise ValueError(f"`sep` must be '.' or '/', got {sep!r}.")
    tensors = flatten_params(merged_params(adapted), sep)
    # "format": "flax" is what transformers' Flax loader requires in the header.
    metadata = {"format": "flax", "svft_jax_sep": sep}
    return atomic_write(path, safetensors_chunks(tensors, metadata), overwrite=overwrite, what="merged export")


def load_merged_safetensors(path) -> dict:
    """Nested params (numpy) from `save_merged_safetensors`."""
    tensors, metadata = read_safetensors(path, "merged safetensors export")
    return unflatten_params(tensors, metadata.get("svft_jax_sep", "."))
