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
    sampler.transformer_state = nnx.state(model, nnx.LoRAParam)        # after training: a LoRA-only sync

The sampler keeps the model's graphdef (the adapted class) and state, so its jitted prefill and
decode run the adapters. The adapters' trainable arrays are plain `nnx.LoRAParam`s (told apart
by their `adapter_method` metadata; `AdapterParam` is that test), because Tunix's sampler takes
a LoRA-only state only when every variable's type *is* `nnx.LoRAParam`
(`tunix/generate/sampler.py`, `transformer_state` setter); the whole state
(`nnx.variables(model)`) syncs too.

Tunix's RL (GRPO, DPO, ... through `RLCluster`) with the vanilla rollout:
  * actor and rollout on one mesh (colocated, Tunix's default): the rollout samples the actor
    model itself, `RLLearner` finds the weights shared (`rl_utils.is_sharing_weights`) and never
    calls `sync_weights`; the rollout generates with the trained M
    (`tests/test_nnx_tunix.py::test_tunix_rl_colocated_rollout_shares_the_actor_so_generates_the_new_m_with_no_sync`);
  * rollout on another mesh: `RLCluster.sync_weights` pushes `nnx.state(actor, nnx.LoRAParam)`,
    but `VanillaRollout.update_params` (also used by `offload_to_cpu`) ends with
    `sampler.transformer_state = nnx.variables(new_model, nnx.Param)`, which drops every
    variable that is not a Param: the frozen U, s, V (`AdapterFactor`) are not, so Tunix
    refuses it ("same structure"; pinned by `..._disaggregated_vanilla_rollout_sync_is_refused_...`).
    Making the factors Params would let it pass, but then `nnx.grad`'s default and any
    `wrt=nnx.Param` filter would differentiate and train U, s, V; they stay non-Params, so an
    SVFT actor runs colocated (a merged model, `merge(nnx.clone(model))`, syncs as any other).

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
