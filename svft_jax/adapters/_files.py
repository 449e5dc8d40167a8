"""Saving and loading adapter sets: one ordinary SVFT adapter file per adapter, plus an index."""

from __future__ import annotations

import json
import pathlib

from svft_jax.adapters._node import AdapterSetNode
from svft_jax.adapters._set import _nodes, add, create, extract, names

INDEX = "adapters.json"


def save(folder, set_tree, *, only=None, overwrite: bool = False, base_params=None) -> list[pathlib.Path]:
    """Write each adapter (or those in `only`) as `folder/<name>.safetensors`, an ordinary
    `svft_jax.checkpoint.save_adapter` file (loadable alone with `load_adapter`), and an index
    `folder/adapters.json` with the bank order.

    Raises:
      ValueError for an unknown name; FileExistsError unless `overwrite`. A `combine` of
      adapters with different Ω is written, but its union Ω is no pattern that a base can
      re-create, so `load` refuses it (naming the target): save its parts and re-combine.
    """
    from svft_jax.checkpoint import save_adapter

    known = names(set_tree)
    chosen = list(known if only is None else ([only] if isinstance(only, str) else only))
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise ValueError(f"save: no adapter named {unknown[0]!r}; the set holds {list(known)}.")
    _nodes(set_tree, AdapterSetNode, "save")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for n in chosen:
        if "/" in n or n.startswith("."):
            raise ValueError(f"save: adapter name {n!r} is not a file name; rename it (add/remove) before saving.")
        written.append(save_adapter(folder / f"{n}.safetensors", extract(set_tree, n), overwrite=overwrite, base_params=base_params))
    index = folder / INDEX
    previous = json.loads(index.read_text())["adapters"] if index.exists() else []
    order = previous + [n for n in chosen if n not in previous]
    index.write_text(json.dumps({"adapters": order}, indent=1))
    return written


def load(folder, base_params, *, only=None, factors=None):
    """The adapter set saved in `folder` (or the adapters in `only`), in the saved bank order.

    Each file is verified by `svft_jax.checkpoint.load_adapter` (base fingerprint, Ω, update
    probes). The SVDs run once: the files share one factor store (`factors`, or a new dict).
    """
    from svft_jax.checkpoint import load_adapter

    folder = pathlib.Path(folder)
    index = folder / INDEX
    if not index.exists():
        raise FileNotFoundError(f"load: {str(index)!r} not found; save the set with svft_jax.adapters.save(folder, tree).")
    order = json.loads(index.read_text())["adapters"]
    chosen = order if only is None else ([only] if isinstance(only, str) else list(only))
    unknown = [n for n in chosen if n not in order]
    if unknown:
        raise ValueError(f"load: {str(folder)!r} holds no adapter {unknown[0]!r}; it holds {order}.")
    store = {} if factors is None else factors
    tree = None
    for n in chosen:
        adapted = load_adapter(folder / f"{n}.safetensors", base_params, factors=store)
        tree = create(adapted, n) if tree is None else add(tree, n, adapted)
    return tree
