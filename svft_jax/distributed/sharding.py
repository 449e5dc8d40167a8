"""Data parallelism (and optional FSDP-style sharding of frozen weights) with `jax.sharding`.

A `Mesh` with axes ("data", "model"): the batch's leading axis is split over "data"; SVFT's
trainable M (|Ω| floats per target) and any head are replicated, because an all-reduce of
M's gradient is far cheaper than sharding something that small. Frozen arrays (U, V, W0 and
untouched weights) are replicated by default, or split over "model" along their largest
divisible axis (`fsdp=True`), which cuts each device's copy of the base model by the
"model" size; XLA gathers them where the forward pass needs them. `jit` then runs the
ordinary `make_train_step` data-parallel: it sees sharded inputs and inserts the gradient
all-reduce itself.

Every placement helper also works multi-process (`jax.distributed.initialize`): batches are
built from each process's local rows with `jax.make_array_from_process_local_data`, and
parameters from the (identical) host copy each process holds.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from svft_jax._args import check_bool
from svft_jax.core._partition import FROZEN, labels

DATA, MODEL = "data", "model"


def make_mesh(data: int | None = None, model: int = 1, *, devices=None) -> Mesh:
    """A 2-D device mesh with axes ("data", "model").

    Args:
      data: size of the data-parallel axis (None: all devices / `model`).
      model: size of the axis frozen weights are sharded over with `fsdp=True` (1: none).
      devices: devices to use (default `jax.devices()`, all processes' devices).
    Returns:
      `jax.sharding.Mesh` of shape (data, model).
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(model, bool) or not isinstance(model, int) or model < 1:
        raise ValueError(f"model must be a positive int, got {model!r}.")
    if data is None:
        if len(devices) % model:
            raise ValueError(f"model={model} does not divide the {len(devices)} devices.")
        data = len(devices) // model
    if isinstance(data, bool) or not isinstance(data, int) or data < 1 or data * model > len(devices):
        raise ValueError(f"data={data!r} × model={model} must be a positive size ≤ the {len(devices)} available devices.")
    grid = np.array(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over "data", everything else replicated."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated over the mesh."""
    return NamedSharding(mesh, P())


def shard_batch(batch, mesh: Mesh):
    """Put a batch on the mesh, its leading axis split over "data".

    Args:
      batch: pytree of arrays (B_local, ...). Single-process: the global batch. Multi-process:
        this process's rows (B_local = B_global / process_count), consecutive processes
        holding consecutive blocks.
      mesh: from `make_mesh`.
    Returns:
      The batch as global `jax.Array`s of shape (B_global, ...) sharded by `batch_sharding`.
    Raises:
      ValueError: if B_global is not divisible by the "data" axis size.
    """
    _check_axis(mesh, DATA, "shard_batch", "the batch's leading axis is split over it")
    sharding = batch_sharding(mesh)
    data_size = mesh.shape[DATA]

    def put(path, x):
        x = np.asarray(x)
        global_rows = x.shape[0] * jax.process_count() if x.ndim else 0
        if x.ndim == 0 or global_rows % data_size:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path) or 'batch'} has shape {x.shape}; the global batch size "
                f"({global_rows}) must be divisible by the mesh's data axis ({data_size})."
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(put, batch)


def _check_axis(mesh, axis: str, caller: str, why: str) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{caller}: `mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis not in mesh.axis_names:
        raise ValueError(f"{caller}: the mesh has axes {tuple(mesh.axis_names)} but no {axis!r} axis ({why}); build it with svft_jax.distributed.make_mesh, or name one of its axes {axis!r}.")


def _put(x, sharding: NamedSharding):
    """Place one array, single- or multi-process."""
    if x is None:
        return None
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _fsdp_spec(shape: tuple[int, ...], model_size: int, min_size: int) -> P:
    """Shard the largest axis divisible by `model_size`; small or indivisible arrays replicate."""
    if model_size == 1 or int(np.prod(shape, dtype=int)) < min_size:
        return P()
    candidates = [axis for axis, size in enumerate(shape) if size % model_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda a: shape[a])
    return P(*([None] * axis), MODEL)


def param_shardings(tree, mesh: Mesh, *, fsdp: bool = False, extra: str | None = None, min_size: int = 2**12):
    """A `NamedSharding` per array of an adapted tree (or either half of `split`).

    Trainable leaves (M, gates, `extra`) are replicated. Frozen leaves are replicated, or with
    `fsdp=True` split over "model" along their largest axis divisible by its size (U: d1,
    V: d2, W0: its larger dimension) when they hold at least `min_size` elements.

    Returns:
      A pytree with `tree`'s structure (None holes kept) whose leaves are `NamedSharding`s.
    Raises:
      ValueError for fsdp=True on a mesh without a "model" axis (fsdp=False takes any mesh).
    """
    fsdp = check_bool(fsdp, "fsdp", "param_shardings")
    if fsdp:
        _check_axis(mesh, MODEL, "param_shardings(fsdp=True)", "frozen arrays are split over it")
    model_size = mesh.shape[MODEL] if fsdp else 1
    tags = labels(tree, extra)

    def choose(x, tag):
        if x is None:
            return None
        if tag != FROZEN or not fsdp:
            return replicated(mesh)
        return NamedSharding(mesh, _fsdp_spec(tuple(np.shape(x)), model_size, min_size))

    flat_tags = jax.tree_util.tree_leaves(tags)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if len(flat_tags) != len(leaves):  # pragma: no cover - labels mirrors the tree by construction
        raise ValueError("param_shardings: labels and tree disagree; pass an adapted tree or a half of split.")
    return jax.tree_util.tree_unflatten(treedef, [choose(x, t) for x, t in zip(leaves, flat_tags, strict=True)])


def place(tree, shardings):
    """Put every array of `tree` on the device(s) `shardings` (same structure) names."""
    return jax.tree_util.tree_map(_put, tree, shardings)


def shard_params(tree, mesh: Mesh, *, fsdp: bool = False, extra: str | None = None, min_size: int = 2**12):
    """`place(tree, param_shardings(tree, mesh, ...))`: replicate (or FSDP-shard) parameters."""
    return place(tree, param_shardings(tree, mesh, fsdp=fsdp, extra=extra, min_size=min_size))


def replicate(tree, mesh: Mesh):
    """Every array of `tree` (e.g. an optimiser state) replicated over the mesh."""
    return jax.tree_util.tree_map(lambda x: _put(x, replicated(mesh)), tree)


def gather_to_host(tree):
    """Numpy copies of every array (global arrays are all-gathered first; multi-process safe).

    Real copies, not views of device buffers: a later step may donate (reuse) those buffers.
    """
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.array(x, copy=True)

    return jax.tree_util.tree_map(fetch, tree)
