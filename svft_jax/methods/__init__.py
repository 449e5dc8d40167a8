"""The adapter methods, one folder or file each: `svft/`, `lora.py`, `dora.py`, `vera.py`.

A method's file holds its typed config, plan, node, math and init, and registers the node
(`@adapter_node(method=...)`) in the one registry, `svft_jax.core.METHODS`."""

from svft_jax.methods import dora, lora, svft, vera

__all__ = ["dora", "lora", "svft", "vera"]
