"""Llama / Mistral causal LMs whose output head is tied to the input embedding (as GGUF and
some HF checkpoints store them), built on first use. Both `hf.load_pretrained` and
`gguf.load_gguf` build them, so they live here, below both (no hf <-> gguf import cycle)."""

from __future__ import annotations

import functools

# The classes are reached as `svft_jax.models.hf.FlaxLlamaForCausalLMTied` (their public home).
_PUBLIC_MODULE = "svft_jax.models.hf"


def _tied_module(stock_module: type) -> type:
    """`stock_module` (a transformers *ForCausalLMModule) whose logits use the transposed input embedding when tied."""

    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True,
                 init_cache: bool = False, output_attentions: bool = False, output_hidden_states: bool = False,
                 return_dict: bool = True):
        from transformers.modeling_flax_outputs import FlaxCausalLMOutput

        outputs = self.model(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                             deterministic=deterministic, init_cache=init_cache, output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states, return_dict=return_dict)
        hidden_states = outputs[0]
        if self.config.tie_word_embeddings:
            # As transformers' FlaxGemma / FlaxGPT-J do: one (vocab, hidden) matrix, no lm_head param.
            shared = self.model.variables["params"]["embed_tokens"]["embedding"].T
            logits = self.lm_head.apply({"params": {"kernel": shared}}, hidden_states)
        else:
            logits = self.lm_head(hidden_states)
        if not return_dict:
            return (logits,) + outputs[1:]
        return FlaxCausalLMOutput(logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    return type(stock_module.__name__ + "Tied", (stock_module,), {"__call__": __call__, "__module__": _PUBLIC_MODULE})


def _tied_model_class(stock: type, module_class: type) -> type:
    doc = (f"transformers' {stock.__name__}, except that with `config.tie_word_embeddings` the logits are "
           "`hidden @ embed_tokens.embedding.T` and the parameter tree has no `lm_head` (stored and counted once). "
           "Untied configs behave exactly as the stock class.")
    return type(stock.__name__ + "Tied", (stock,), {"module_class": module_class, "__module__": _PUBLIC_MODULE, "__doc__": doc})


@functools.cache
def tied_classes() -> dict[str, type]:
    # Built on first use so that importing svft_jax.models does not import transformers' Flax models.
    from transformers.models.llama.modeling_flax_llama import (
        FlaxLlamaForCausalLM,
        FlaxLlamaForCausalLMModule,
    )
    from transformers.models.mistral.modeling_flax_mistral import (
        FlaxMistralForCausalLM,
        FlaxMistralForCausalLMModule,
    )

    return {
        "FlaxLlamaForCausalLMTied": _tied_model_class(FlaxLlamaForCausalLM, _tied_module(FlaxLlamaForCausalLMModule)),
        "FlaxMistralForCausalLMTied": _tied_model_class(FlaxMistralForCausalLM, _tied_module(FlaxMistralForCausalLMModule)),
    }


def tied_class_for(cls, config):
    """The tied-head subclass for a stock Llama / Mistral causal LM with a tied config, else `cls`."""
    if not getattr(config, "tie_word_embeddings", False):
        return cls
    for tied in tied_classes().values():
        if cls is tied.__mro__[1]:
            return tied
    return cls
