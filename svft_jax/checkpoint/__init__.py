"""Checkpointing: resumable training checkpoints (Orbax), small adapter files for any adapter
method, merged dense exports (Orbax and safetensors) and factor stores on disk.

    ckpt = svft_jax.checkpoint.TrainCheckpointer("ckpt", max_to_keep=3, best_metric="accuracy", frozen=frozen)
    ckpt.save(step, trainable, opt_state, {"accuracy": acc}, rng=rng, data_position=step)
    svft_jax.checkpoint.save_adapter("adapter.safetensors", adapted)
    adapted = svft_jax.checkpoint.load_adapter("adapter.safetensors", base_params)
    svft_jax.checkpoint.save_merged_safetensors("model.safetensors", adapted)
"""

from svft_jax.checkpoint.adapter import AdapterFile, load_adapter, read_adapter, save_adapter
from svft_jax.checkpoint.cache import (
    FactorFile,
    factor_store,
    load_factor_cache,
    save_factor_cache,
    save_factor_shard,
)
from svft_jax.checkpoint.fingerprint import base_fingerprint, kernel_fingerprint
from svft_jax.checkpoint.manager import CheckpointWarning, RestoredState, TrainCheckpointer
from svft_jax.checkpoint.merged import (
    ExportRecoveryWarning,
    load_merged,
    load_merged_safetensors,
    save_merged,
    save_merged_safetensors,
)
from svft_jax.core._protocol import factor_key

__all__ = [
    "AdapterFile",
    "CheckpointWarning",
    "ExportRecoveryWarning",
    "FactorFile",
    "RestoredState",
    "TrainCheckpointer",
    "base_fingerprint",
    "factor_key",
    "factor_store",
    "kernel_fingerprint",
    "load_adapter",
    "load_factor_cache",
    "load_merged",
    "load_merged_safetensors",
    "read_adapter",
    "save_adapter",
    "save_factor_cache",
    "save_factor_shard",
    "save_merged",
    "save_merged_safetensors",
]
