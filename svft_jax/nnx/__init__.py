"""SVFT in place on Flax NNX models, the way qwix adds LoRA — and Tunix trains it unchanged.

    import svft_jax.nnx as snnx
    model = snnx.adapt(model, snnx.SVFT(pattern=snnx.Banded(d=2)), *dummy_inputs)   # a clone
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)          # trains M only
    print(snnx.summary(model))
    snnx.merge(model)                                                               # dense again, in place

Rules (typed, first match wins): `Rule(path=regex, method=SVFT(...) | LoRA(...) | DoRA(...) |
VeRA(...) | None, layout=..., strategy=...)`. Each weight's (stack, in, out) axes come from the
matmul it takes part in, read once from a trace of the model on the dummy inputs.

Why not qwix's interception (`qwix.QuantizationProvider` + `qwix.quantize_model`): this path
must run where svft-jax runs — Python 3.11 and jax 0.10.2 — and qwix needs Python ≥ 3.12 and
jax ≥ 0.11; and qwix's provider finds a weight and its module through private helpers
(`qwix._src.utils.flax_util.find_param`, frame inspection for the current module), patches
`jax.numpy.einsum`/`jax.lax.dot_general` process-wide, and sees only calls that go through the
patched names. Here the interception is a jaxpr interpreter the library already has and tests
(`svft_jax.wrap`): every way a weight reaches a `dot_general` (einsum, dot, `@`, a captured
`lax.dot_general`) is seen, `scan`/remat/custom-vjp bodies are followed, and the execution
strategies and their cost model are the same code as the pytree API's. qwix remains what it is
for LoRA; a qwix-LoRA model and an SVFT model train the same way in Tunix.
"""

from svft_jax.nnx._adapt import (
    LeftOut,
    Report,
    Target,
    adapt,
    from_tree,
    is_adapted,
    load_adapter,
    merge,
    params,
    report,
    save_adapter,
    summary,
    to_tree,
)
from svft_jax.nnx._config import (
    SVFT,
    Banded,
    DoRA,
    LoRA,
    Method,
    Pattern,
    Plain,
    Random,
    Rule,
    TopK,
    VeRA,
)
from svft_jax.nnx._variables import AdapterFactor, AdapterParam, Omega

__all__ = [
    "SVFT",
    "AdapterFactor",
    "AdapterParam",
    "Banded",
    "DoRA",
    "LeftOut",
    "LoRA",
    "Method",
    "Omega",
    "Pattern",
    "Plain",
    "Random",
    "Report",
    "Rule",
    "Target",
    "TopK",
    "VeRA",
    "adapt",
    "from_tree",
    "is_adapted",
    "load_adapter",
    "merge",
    "params",
    "report",
    "save_adapter",
    "summary",
    "to_tree",
]
