"""SVFT in place on Flax NNX models, the way qwix adds LoRA — and Tunix trains it unchanged.

    import svft_jax.nnx as snnx
    print(snnx.size(base, snnx.SVFT(pattern=snnx.Banded(d=2)), *dummy_inputs))     # no SVD: counts, memory, FLOPs
    model = snnx.adapt(base, snnx.SVFT(pattern=snnx.Banded(d=2)), *dummy_inputs)   # a clone
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)         # trains M only
    print(snnx.summary(model))
    snnx.merge(model)                                                              # dense again, in place

`SVFT(pattern=snnx.Banded(), budget=N)` lets SVFT pick the one d whose trainable total over the
adapted weights is the largest ≤ N (`Random()`/`TopK()`: k per weight); `size` shows the choice.

Generation with Tunix's sampler (greedy tokens equal the merged model's, `tests/test_nnx_tunix.py`):

    from tunix.generate import sampler as sampler_lib
    sampler = sampler_lib.Sampler(model, tokenizer, sampler_lib.CacheConfig(cache_size=..., num_layers=...,
                                                                             num_kv_heads=..., head_dim=...))
    out = sampler(prompts, max_generation_steps=64, temperature=0.0)   # the adapters run at each step
    sampler.transformer_state = nnx.variables(model)                   # after training: sync the whole state

The sampler keeps the model's graphdef (the adapted class) and state, so its jitted prefill and
decode run the adapters. Tunix 0.1.x refuses the two partial syncs: a LoRA-only state
(`nnx.state(model, nnx.LoRAParam)`: it wants the exact type `nnx.LoRAParam`, ours is the subclass
`AdapterParam`) and a Param-only one (`nnx.variables(model, nnx.Param)`, what its vanilla RL
rollout passes: the frozen U, s, V are `AdapterFactor`s, not Params). Sync the whole state, or
serve a merged model (`merge(nnx.clone(model))`), whose Params sync as any plain model's.

Rules are the library's typed rules (`svft_jax.Rule`, first match wins; re-exported here with
the method configs and patterns): `Rule(path=regex | None, method=SVFT(...) | LoRA(...) |
DoRA(...) | VeRA(...) | None, layout=..., strategy=...)`; path=None is the default targets and
`layout` is checked against the op, not declared. Each weight's (stack, in, out) axes come from the
matmul it takes part in, read once from a trace of the model on the dummy inputs.

Why not qwix's interception (`qwix.QuantizationProvider` + `qwix.quantize_model`), decided for
this path:
  * qwix is optional (the `[nnx]` extra, installed on Python ≥ 3.12 only), and this path must
    work without it, down to the oldest supported stack (Python 3.11, jax 0.10.2, flax 0.12.8);
  * a qwix provider finds the weight of an op and its module through private helpers
    (`qwix._src.utils.flax_util.find_param`, a frame walk for the current module), patches
    `jax.numpy.einsum` / `jax.lax.dot_general` process-wide, and sees only calls made through the
    names it patched;
  * the library already has a tested interceptor at the op: `svft_jax.wrap`'s jaxpr interpreter.
    It sees every way a weight reaches a `dot_general` (einsum, dot, `@`, a captured
    `lax.dot_general`), follows scan/remat/custom-vjp bodies, and runs the same strategies and
    cost model as the pytree API, so execution is not implemented twice.
qwix stays what it is for LoRA; a qwix-LoRA model and an SVFT model train the same way in Tunix
(`experiments/bench/nnx.py` runs both). One difference worth knowing: qwix 0.1.8 swaps the
model's class with `type(...)`, which drops Tunix's `pytree=False` on flax 0.12.12 (gradients
then fail); `adapt` keeps the original class's pytree mode.
"""

from svft_jax.core import Method, Rule
from svft_jax.methods.dora import DoRA
from svft_jax.methods.lora import LoRA
from svft_jax.methods.svft import SVFT
from svft_jax.methods.vera import VeRA
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
    size,
    summary,
    to_tree,
)
from svft_jax.nnx._variables import AdapterFactor, AdapterParam, Omega
from svft_jax.patterns import Banded, Named, Pattern, Plain, Random, TopK

__all__ = [
    "SVFT",
    "AdapterFactor",
    "AdapterParam",
    "Banded",
    "DoRA",
    "LeftOut",
    "LoRA",
    "Method",
    "Named",
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
    "size",
    "summary",
    "to_tree",
]
