"""Checkpointing: resumable training checkpoints (Orbax), small adapter files, merged
dense exports (Orbax and safetensors) and a cache of SVD factors.

    ckpt = svft_jax.checkpoint.TrainCheckpointer("ckpt", max_to_keep=3, best_metric="accuracy")
    ckpt.save(step, trainable, opt_state, {"accuracy": acc}, rng=rng, data_position=step)
    svft_jax.checkpoint.save_adapter("adapter.safetensors", adapted)
    adapted = svft_jax.checkpoint.load_adapter("adapter.safetensors", base_params)
    svft_jax.checkpoint.save_merged_safetensors("model.safetensors", adapted)
"""

from svft_jax.checkpoint.adapter import AdapterFile, load_adapter, read_adapter, save_adapter
from svft_jax.checkpoint.cache import load_factor_cache, save_factor_cache
from svft_jax.checkpoint.fingerprint import base_fingerprint, kernel_fingerprint, verify_fingerprint
from svft_jax.checkpoint.manager import RestoredState, TrainCheckpointer
from svft_jax.checkpoint.merged import (
    flatten_params,
    load_merged,
    load_merged_safetensors,
    merged_params,
    save_merged,
    save_merged_safetensors,
    unflatten_params,
)

__all__ = [
    "AdapterFile",
    "RestoredState",
    "TrainCheckpointer",
    "base_fingerprint",
    "flatten_params",
    "kernel_fingerprint",
    "load_adapter",
    "load_factor_cache",
    "load_merged",
    "load_merged_safetensors",
    "merged_params",
    "read_adapter",
    "save_adapter",
    "save_factor_cache",
    "save_merged",
    "save_merged_safetensors",
    "unflatten_params",
    "verify_fingerprint",
]
