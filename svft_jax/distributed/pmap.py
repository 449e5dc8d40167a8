"""The `pmap` route to data parallelism: replicated parameters with a leading device axis,
the batch reshaped to (devices, B / devices, ...), gradients averaged with `lax.pmean`.

Equivalent to the `jax.sharding` route in `sharding.py` (tests check they agree); kept for
code that still uses `pmap`. New code should prefer `jit` + `shard_batch`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from svft_jax.training.step import train_step_fn

AXIS = "data"


def make_pmap_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    accumulation_steps: int = 1,
    axis_name: str = AXIS,
    devices=None,
) -> Callable:
    """A `pmap`-ed train step with the semantics of `make_train_step`.

    Args:
      loss_fn, tx, accumulation_steps: as `svft_jax.training.make_train_step` (accumulation
        splits each device's share of the batch).
      axis_name: the pmap axis the gradients are `pmean`-ed over.
      devices: devices to map over (default: all local devices).
    Returns:
      step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, metrics).
      trainable, frozen, opt_state come from `replicate_for_pmap`; batch from
      `split_for_pmap`; rng is one key shared by all devices, folded with the device index so
      that dropout differs per device. Metrics come back with a leading device axis (equal
      entries after the pmean).
    """
    step = train_step_fn(loss_fn, tx, accumulation_steps=accumulation_steps, axis_name=axis_name)

    def per_device(trainable, frozen, opt_state, batch, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        return step(trainable, frozen, opt_state, batch, rng)

    return jax.pmap(per_device, axis_name=axis_name, in_axes=(0, 0, 0, 0, None), devices=devices)


def replicate_for_pmap(tree, devices=None):
    """Stack a copy of every array on each device: leaves get a leading (devices,) axis.

    (`jax.device_put_replicated` is deprecated since jax 0.8; this is its replacement: the
    stacked array sharded over a 1-D mesh of `devices`, the layout the jit-based `pmap` wants.)
    """
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = NamedSharding(Mesh(np.array(devices, dtype=object), ("devices",)), P("devices"))

    def put(x):
        x = jnp.asarray(x)
        return jax.device_put(jnp.broadcast_to(x[None], (len(devices), *x.shape)), sharding)

    return jax.tree_util.tree_map(put, tree)


def unreplicate(tree):
    """The first device's copy of each replicated leaf."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def split_for_pmap(batch, num_devices: int | None = None):
    """(B, ...) -> (devices, B / devices, ...), device i getting rows [i·B/D, (i+1)·B/D).

    Raises:
      ValueError: if B is not divisible by the device count.
    """
    num_devices = jax.local_device_count() if num_devices is None else num_devices

    def split(path, x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % num_devices:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path) or 'batch'} has shape {x.shape}; its leading axis must be divisible by the {num_devices} devices.")
        return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])

    return jax.tree_util.tree_map_with_path(split, batch)
