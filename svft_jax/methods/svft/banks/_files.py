"""Saving and loading adapter sets: one ordinary SVFT adapter file per adapter, plus an index.

The index `adapters.json` is {"adapters": [names in bank order]}: it names exactly the adapters
of the last `save`, and `load` reads only the files it names (a stale file left in the folder by
an earlier save is never loaded, so routing ids keep their meaning).
"""

from __future__ import annotations

import json
import os
import pathlib

from svft_jax.methods.svft.banks._node import AdapterSetNode
from svft_jax.methods.svft.banks._set import _nodes, add, create, extract, names

INDEX = "adapters.json"


def _check_file_name(name: str, caller: str) -> None:
    """Refuse a name that is not one plain file name in the folder."""
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    if not isinstance(name, str) or not name or name.startswith(".") or "\x00" in name or any(s in name for s in separators):
        raise ValueError(f"{caller}: adapter name {name!r} is not a file name (it is empty, starts with '.', or holds a "
                         "path separator or NUL), so it cannot be saved as <name>.safetensors; rename it "
                         "(adapters.remove, then adapters.add under another name) before saving. Nothing was written.")


def _read_index(index: pathlib.Path, caller: str) -> list[str]:
    """The names an index file lists, validated; ValueError naming the file when it is damaged."""
    fix = "re-save the set with svft_jax.adapters.save(folder, tree, overwrite=True)"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{caller}: the adapter-set index {str(index)!r} is not valid JSON ({err}); it was truncated "
                         f"or edited. Restore it, or {fix}.") from None
    order = data.get("adapters") if isinstance(data, dict) else None
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order) or len(set(order)) != len(order) or not order:
        raise ValueError(f"{caller}: the adapter-set index {str(index)!r} is not an index of ours: it must be a JSON object "
                         f"{{\"adapters\": [distinct names]}}, got {str(data)[:80]!r}. Restore it, or {fix}.")
    for n in order:
        _check_file_name(n, f"{caller}: index {str(index)!r}")
    return order


def save(folder, set_tree, *, only=None, overwrite: bool = False, base_params=None) -> list[pathlib.Path]:
    """Write each adapter (or those in `only`) as `folder/<name>.safetensors`, an ordinary
    `svft_jax.checkpoint.save_adapter` file (loadable alone with `load_adapter`), and an index
    `folder/adapters.json` naming exactly the adapters written, in bank order.

    The index replaces any earlier one (a removed or reordered adapter does not come back
    from an old file on `load`); files of adapters it no longer names are left in place but are
    never loaded.

    Raises:
      ValueError for an unknown name or a name that is not a file name (every name is checked
      before anything is written); FileExistsError unless `overwrite`, when the index or an
      adapter's file exists (checked before anything is written). A `combine` of adapters with
      different Ω is written, but its union Ω is no pattern that a base can re-create, so `load`
      refuses it (naming the target): save its parts and re-combine.
    """
    from svft_jax.checkpoint import save_adapter

    known = names(set_tree)
    requested = [only] if isinstance(only, str) else list(known if only is None else only)
    unknown = [n for n in requested if n not in known]
    if unknown:
        raise ValueError(f"save: no adapter named {unknown[0]!r}; the set holds {list(known)}.")
    chosen = [n for n in known if n in requested]  # bank order, whatever order `only` lists
    if not chosen:
        raise ValueError("save: `only` names no adapter; pass None to save the whole set, or the names to save.")
    for n in chosen:
        _check_file_name(n, "save")
    _nodes(set_tree, AdapterSetNode, "save")
    folder = pathlib.Path(folder)
    index = folder / INDEX
    if not overwrite:
        existing = [p for p in (index, *(folder / f"{n}.safetensors" for n in chosen)) if p.exists()]
        if existing:
            raise FileExistsError(f"save: {str(existing[0])!r} exists (a set was saved in {str(folder)!r} before); pass "
                                  "overwrite=True to replace that set, or save into another folder. Nothing was written.")
    folder.mkdir(parents=True, exist_ok=True)
    written = [save_adapter(folder / f"{n}.safetensors", extract(set_tree, n), overwrite=overwrite, base_params=base_params)
               for n in chosen]
    # The index last, by rename: it never names a file that is not complete.
    partial = folder / f".{INDEX}.tmp"
    partial.write_text(json.dumps({"adapters": chosen}, indent=1), encoding="utf-8")
    os.replace(partial, index)
    return written


def load(folder, base_params, *, only=None, factors=None):
    """The adapter set saved in `folder` (or the adapters in `only`), in the saved bank order.

    Each file is verified by `svft_jax.checkpoint.load_adapter` (base fingerprint, Ω, update
    probes). The SVDs run once: the files share one factor store (`factors`, or a new dict).
    Only the files the index names are read.

    Raises:
      FileNotFoundError without an index; ValueError naming the index when it is damaged (not
      JSON, not {"adapters": [names]}), for a name it does not hold, or from `add` when the
      files' adapters do not share one base (or one value of a leaf trained in full).
    """
    from svft_jax.checkpoint import load_adapter

    folder = pathlib.Path(folder)
    index = folder / INDEX
    if not index.exists():
        raise FileNotFoundError(f"load: {str(index)!r} not found; save the set with svft_jax.adapters.save(folder, tree).")
    order = _read_index(index, "load")
    requested = [only] if isinstance(only, str) else (order if only is None else list(only))
    unknown = [n for n in requested if n not in order]
    if unknown:
        raise ValueError(f"load: {str(folder)!r} holds no adapter {unknown[0]!r}; it holds {order}.")
    store = {} if factors is None else factors
    tree = None
    for n in (n for n in order if n in requested):  # bank order, whatever order `only` lists
        adapted = load_adapter(folder / f"{n}.safetensors", base_params, factors=store)
        tree = create(adapted, n) if tree is None else add(tree, n, adapted)
    return tree
