"""Merged export: W = W0 + U M Vᵀ folded into plain dense params the unmodified model loads.

Two containers:
  * `save_merged` — an Orbax (StandardCheckpointer) directory of the dense pytree, for JAX
    users: `load_merged(path)` or `ocp.StandardCheckpointer().restore(path)`.
  * `save_merged_safetensors` — one safetensors file with flattened names, for everything
    else. With sep="." and a Hugging Face Flax model's `params`, the file is exactly what
    `FlaxPreTrainedModel.save_pretrained(..., safe_serialization=True)` writes, so
    `FlaxXxxModel.from_pretrained(dir)` reads it (put it next to the model's config.json as
    `model.safetensors`). Kernels keep Flax's (in, out) layout.

Nothing the user made is ever deleted, and a SIGKILL at any point leaves either the old or
the new export at `path`:
  * `overwrite=True` replaces only a previous export of ours: a folder holding our marker
    file (`svft_jax_merged_export.json`), or a safetensors file whose header carries our
    keys. Anything else at `path` is refused.
  * The new export is written completely into a hidden sibling, then swapped in with one
    atomic `renameat2(RENAME_EXCHANGE)` (a file: one `os.replace`); the old one is deleted
    afterwards. Where the file system cannot exchange, two renames are used and a kill
    between them is repaired by the next call (which warns).
  * Hidden siblings of a killed call (`.<name>.svft-new-<pid>-…`, `.<name>.svft-old-<pid>-…`)
    are deleted by the next call for the same `path`, so they never accumulate.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from svft_jax._args import check_bool
from svft_jax._paths import key_to_str
from svft_jax.checkpoint._files import (
    atomic_write,
    dead_siblings,
    ensure_directory,
    exchange_paths,
    read_safetensors,
    read_safetensors_metadata,
    remove_path,
    rename_no_replace,
    safetensors_chunks,
    temp_sibling,
)
from svft_jax.core import merge
from svft_jax.errors import ExportRecoveryWarning

MERGED_FORMAT = "svft-jax-merged-export"
MERGED_MARKER = "svft_jax_merged_export.json"
_NEW, _OLD = "svft-new", "svft-old"


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


def _is_our_export(folder: Path) -> bool:
    """True if `folder` holds our marker file (written last, so it also means complete)."""
    try:
        info = json.loads((folder / MERGED_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == MERGED_FORMAT


def _tidy(path: Path) -> None:
    """Delete what killed earlier calls for `path` left behind; put an export back at `path`
    if a kill landed between the two renames of the fallback swap."""
    leftovers = dead_siblings(path, [_NEW, _OLD])
    if not path.exists():
        complete = [p for p in leftovers if p.is_dir() and _is_our_export(p)]
        # Prefer the new export (its marker is written last, so it is complete) over the old.
        complete.sort(key=lambda p: (_NEW not in p.name, -p.stat().st_mtime))
        if complete:
            rename_no_replace(complete[0], path)
            warnings.warn(f"merged export {str(path)!r} was missing after an interrupted overwrite; restored it from {complete[0].name}.", ExportRecoveryWarning, stacklevel=3)
            leftovers.remove(complete[0])
    for leftover in leftovers:
        remove_path(leftover)


def save_merged(path, adapted, *, overwrite: bool = False) -> Path:
    """Write the merged dense params as an Orbax checkpoint directory.

    The export is written completely (Orbax data, then our marker file) into a hidden
    sibling folder before it appears at `path`, so a crash or SIGKILL never leaves a partial
    export there; with overwrite=True the old export stays at `path` until the new one is
    swapped in atomically (see the module docstring).

    Args:
      path: destination directory (must not exist unless overwrite=True).
      adapted: an adapted tree (SVFT or baseline nodes) or plain params.
      overwrite: replace an existing export written by `save_merged` (a folder with our
        marker file); any other folder at `path` is refused, never deleted.
    Returns:
      The absolute path written.
    Raises:
      FileExistsError: `path` exists and overwrite=False.
      ValueError: `path` is a file or a folder that is not one of our exports (before any
        work), or its parent cannot be written.
      OSError: an I/O failure (disk full, ...); the export at `path`, if any, is unchanged.
    """
    overwrite = check_bool(overwrite, "overwrite", "save_merged")
    path = Path(path).absolute()
    _tidy(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"merged export {str(path)!r} already exists; pass overwrite=True to replace it.")
        if path.is_symlink() or not path.is_dir() or not _is_our_export(path):
            raise ValueError(f"{str(path)!r} is not a merged export written by svft_jax.checkpoint.save_merged (no {MERGED_MARKER} in it), so overwrite=True will not replace it; choose another path, or delete it yourself if you mean to.")
    ensure_directory(path.parent, "the merged export")
    params = merged_params(adapted)
    staging = temp_sibling(path, _NEW)
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(staging, params)
        checkpointer.wait_until_finished()
        atomic_write(staging / MERGED_MARKER, [json.dumps({"format": MERGED_FORMAT, "version": 1}).encode()],
                     overwrite=False, what="merged export marker")
    except OSError as err:
        remove_path(staging)
        raise OSError(err.errno, f"could not write the merged export to {str(path)!r}: {err.strerror or err}; an existing export is unchanged.") from err
    except BaseException:
        remove_path(staging)
        raise
    finally:
        checkpointer.close()
    if not path.exists():
        rename_no_replace(staging, path)
        return path
    if exchange_paths(staging, path):
        old = staging  # after the exchange the staging name holds the old export
    else:  # no atomic exchange on this file system: two renames, repaired by `_tidy` if killed between
        old = temp_sibling(path, _OLD)
        path.rename(old)
        staging.rename(path)
    if _is_our_export(old):
        remove_path(old)
    else:  # `path` was replaced by someone else after our check: keep their folder
        warnings.warn(f"{str(path)!r} changed while the merged export was written; the folder that was there is kept at {str(old)!r}.", ExportRecoveryWarning, stacklevel=2)
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
      overwrite: replace an existing export of ours (write-then-rename: a SIGKILL leaves
        the old or the new file); any other file at `path` is refused.
    Returns:
      The path written.
    Raises:
      ValueError: overwrite=True but the file at `path` is not one of our exports.
      FileExistsError, OSError: as `save_merged`.
    """
    if sep not in (".", "/"):
        raise ValueError(f"`sep` must be '.' or '/', got {sep!r}.")
    overwrite = check_bool(overwrite, "overwrite", "save_merged_safetensors")
    path = Path(path)
    if overwrite and path.is_file() and "svft_jax_sep" not in (read_safetensors_metadata(path) or {}):
        raise ValueError(f"{str(path)!r} is not a merged export written by svft_jax.checkpoint.save_merged_safetensors, so overwrite=True will not replace it; choose another path, or delete it yourself if you mean to.")
    tensors = flatten_params(merged_params(adapted), sep)
    # "format": "flax" is what transformers' Flax loader requires in the header;
    # "svft_jax_sep" marks the file as ours (overwrite=True replaces only such files).
    metadata = {"format": "flax", "svft_jax_sep": sep}
    return atomic_write(path, safetensors_chunks(tensors, metadata), overwrite=overwrite, what="merged export")


def load_merged_safetensors(path) -> dict:
    """Nested params (numpy) from `save_merged_safetensors`."""
    tensors, metadata = read_safetensors(path, "merged safetensors export")
    return unflatten_params(tensors, metadata.get("svft_jax_sep", "."))
