"""Data parallelism for SVFT training: `jax.sharding` meshes (data axis, optional FSDP-style
"model" axis for frozen weights), an equivalent `pmap` path, and multi-process helpers.

    mesh = make_mesh()                                   # ("data", "model") over all devices
    trainable, frozen = shard_params(trainable, mesh), shard_params(frozen, mesh, fsdp=True)
    trainable, opt_state, metrics = train_step(trainable, frozen, opt_state, shard_batch(batch, mesh), rng)
"""

from svft_jax.distributed.pmap import (
    make_pmap_train_step,
    replicate_for_pmap,
    split_for_pmap,
    unreplicate,
)
from svft_jax.distributed.sharding import (
    DATA,
    MODEL,
    batch_sharding,
    gather_to_host,
    make_mesh,
    param_shardings,
    place,
    replicate,
    replicated,
    shard_batch,
    shard_params,
)

__all__ = [
    "DATA",
    "MODEL",
    "batch_sharding",
    "gather_to_host",
    "make_mesh",
    "make_pmap_train_step",
    "param_shardings",
    "place",
    "replicate",
    "replicate_for_pmap",
    "replicated",
    "shard_batch",
    "shard_params",
    "split_for_pmap",
    "unreplicate",
]
