"""Many SVFT adapters on one base: adapter sets, hot-swap, per-example routing, arithmetic.

Every SVFT adapter of one base shares the frozen U, s, V (and W0); adapters differ only in their
coefficients on Ω. An *adapter set* keeps one copy of the factors and a bank of K coefficient
vectors per target (`AdapterSetNode`); which adapters are on is an array (weights), so:

    import svft_jax, svft_jax.adapters as adapters
    tree = adapters.create(svft_jax.apply(params, "banded", d=2), "sst")   # one adapter
    tree = adapters.add(tree, "topic", other_adapted)                       # same base
    fwd = jax.jit(svft_jax.wrap(model.apply, strategy="routed"))
    fwd(adapters.select(tree, "topic"), x)     # hot-swap: no retrace
    fwd(adapters.select(tree, None), x)        # the base model
    fwd(adapters.route(tree, ids), x)          # example b runs adapter ids[b], one pass
    fwd(adapters.mix(tree, {"sst": .5, "topic": .5}), x)                   # Σ w_k ΔW_k
    one = adapters.extract(tree, "sst")        # ordinary SVFT tree: train / save / summary
    tree = adapters.insert(tree, "sst", trained)

Importing this module registers the "routed" strategy of `svft_jax.wrap`.
"""

from svft_jax.methods.svft.banks import _strategy as _strategy  # noqa: F401  (registers "routed")
from svft_jax.methods.svft.banks._arithmetic import combine, transformer2_mix
from svft_jax.methods.svft.banks._files import load, save
from svft_jax.methods.svft.banks._node import AdapterSetNode, SetMeta, is_set_node
from svft_jax.methods.svft.banks._set import (
    add,
    create,
    extract,
    insert,
    mix,
    names,
    remove,
    route,
    select,
    summary,
    weights_for,
    with_weights,
)
from svft_jax.methods.svft.banks._strategy import routed

__all__ = [
    "AdapterSetNode",
    "SetMeta",
    "add",
    "combine",
    "create",
    "extract",
    "insert",
    "is_set_node",
    "load",
    "mix",
    "names",
    "remove",
    "route",
    "routed",
    "save",
    "select",
    "summary",
    "transformer2_mix",
    "weights_for",
    "with_weights",
]
