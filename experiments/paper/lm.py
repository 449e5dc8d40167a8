"""Causal-LM pieces shared by the math and commonsense scripts: the Alpaca prompt, SFT
tokenisation with a response-only loss mask, the SFT Task, and batched greedy decoding."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import svft_jax
from experiments.harness import data, models
from experiments.harness.text import ByteTokenizer, load_tokenizer, pad_to
from experiments.harness.train import Task, run
from experiments.paper import common
from svft_jax.training import losses


@dataclasses.dataclass(frozen=True)
class LMOptions(common.PaperOptions):
    """Flags of the causal-LM tasks (math, commonsense).

    Attributes:
      train_json: the authors' training file (JSON list) instead of the TFDS train splits.
      max_length: tokens per training example (None: the table's).
      max_prompt_length, max_new_tokens, eval_batch_size: greedy decoding.
      dtype: model computation dtype ('bfloat16' as in the paper's runs, or 'float32').
      factor_dtype: SVFT factor storage dtype (e.g. bfloat16 for 7B models).
    """

    train_json: str | None = None
    max_length: int | None = None
    max_prompt_length: int = 256
    max_new_tokens: int = 256
    eval_batch_size: int = 8
    dtype: str = "bfloat16"
    factor_dtype: str | None = None

# The Alpaca template used by both MetaMath (train_math.py) and LLM-Adapters (finetune.py).
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str) -> str:
    """The Alpaca prompt around `instruction` (the response follows directly)."""
    return PROMPT_TEMPLATE.format(instruction=instruction)


def tiny_causal_lm():
    """A 1-layer random Llama over ByteTokenizer ids (tests; nothing downloaded)."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    tokenizer = ByteTokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
    )
    model, params = models.init_tiny(FlaxLlamaForCausalLM, config, (1, 8))
    return model, params, tokenizer


def load_causal_lm(name: str, dtype: str = "bfloat16"):
    """(Flax causal LM, params, tokenizer): `FlaxAutoModelForCausalLM.from_pretrained(name)` or the tiny one.

    Args:
      name: hub name or local directory (Gemma, Llama, GPT-2, ... with Flax support), or 'tiny'.
      dtype: computation dtype of the model ('bfloat16' as in the paper's runs, or 'float32').
    """
    if name == "tiny":
        return tiny_causal_lm()
    from transformers import FlaxAutoModelForCausalLM

    model = FlaxAutoModelForCausalLM.from_pretrained(name, dtype=jnp.dtype(dtype))
    return model, model.params, load_tokenizer(name)


def encode_sft(prompt: str, response: str, *, tokenizer, max_length: int) -> dict[str, np.ndarray]:
    """[bos] prompt response [eos], right-padded; the loss covers response + eos only.

    Returns:
      input_ids (max_length,) int32, attention_mask (max_length,) int32,
      loss_mask (max_length,) int32 (1 on response and eos tokens that fit).
    """
    prompt_ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
    response_ids = tokenizer.encode(response) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    ids, attention = pad_to(prompt_ids + response_ids, max_length, tokenizer.pad_id)
    loss_mask = np.zeros(max_length, np.int32)
    loss_mask[len(prompt_ids) : len(prompt_ids) + len(response_ids)] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask * attention}


def make_sft_task(model, adapted, train_examples: Sequence[tuple[str, str]], *, tokenizer, max_length, batch_size, seed, name,
                  full_finetune=False):
    """The driver's Task: next-token loss on responses of (prompt, response) pairs."""
    encode = lambda pair: encode_sft(pair[0], pair[1], tokenizer=tokenizer, max_length=max_length)  # noqa: E731

    run_model = models.run_adapted(model)  # the adapted tree, never a merged copy

    def loss_fn(adapted, batch, rng):
        logits = run_model(
            batch["input_ids"], attention_mask=batch["attention_mask"], params=adapted,
            dropout_rng=rng, train=True,
        ).logits
        return losses.causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"])

    return Task(
        adapted=adapted,
        loss_fn=loss_fn,
        full_finetune=full_finetune,
        train_data=lambda epoch: data.train_batches(train_examples, encode, batch_size=batch_size, seed=seed, epoch=epoch),
        count_tokens=lambda batch: int(np.sum(batch["attention_mask"])),
        name=name,
    )


def greedy_generate(model, params, prompts: Sequence[str], *, tokenizer, batch_size: int, max_prompt_length: int, max_new_tokens: int) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches; one compiled generate).

    Prompts longer than `max_prompt_length` tokens keep their last tokens (the question end
    and the response header matter most). Decoding stops at eos; the text after it is dropped.
    A ragged last chunk is completed by the harness's padding rule (`data.pad_rows`).

    Returns:
      One decoded continuation per prompt, in order.
    """
    pad_id, eos_id = tokenizer.pad_id, tokenizer.eos_id
    run = _compiled_generate(model, pad_id, eos_id, max_new_tokens)
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk, valid = data.pad_rows(list(prompts[start : start + batch_size]), batch_size)
        encoded = []
        for prompt in chunk:
            ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
            encoded.append(pad_to(ids[-max_prompt_length:], max_prompt_length, pad_id, left=True))
        ids = np.stack([e[0] for e in encoded])
        mask = np.stack([e[1] for e in encoded])
        generated = np.asarray(run(params, ids, mask))
        for row in generated[valid]:
            row = list(row)
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id)]
            outputs.append(tokenizer.decode(row))
    return outputs


@functools.lru_cache(maxsize=8)
def _compiled_generate(model, pad_id: int, eos_id: int | None, max_new_tokens: int):
    """One jitted greedy `model.generate` per (model, settings), reused across calls and tasks."""

    @jax.jit
    def run(params, ids, mask):
        return model.generate(
            ids, attention_mask=mask, params=params, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad_id, eos_token_id=eos_id,
        ).sequences[:, ids.shape[1] :]

    return run


def fine_tune(options: LMOptions, config, given, recipe, pairs, name: str):
    """Shared by the math and commonsense tasks: load the causal LM, adapt it with the preset,
    run supervised fine-tuning on `pairs` with the driver, and return a greedy generator.

    Args:
      options: the task's parsed `LMOptions`; config, given: from `common.setup`.
      recipe: the table's `TableConfig`; pairs: (prompt, response) list; name: the task's name.
    Returns:
      (results of the driver's `run`, its `TrainConfig`, generate(prompts) -> list of strings).
    """
    preset = options.preset
    model, params, tokenizer = load_causal_lm(options.model, options.dtype)
    overrides = {"factor_dtype": options.factor_dtype} if options.factor_dtype and preset.method == "svft" else {}
    adapted = preset.adapt(params, targets=options.targets or recipe.targets_for(preset), seed=options.seed, **overrides)
    config = common.with_steps(config, given, epochs=options.epochs or recipe.epochs, num_examples=len(pairs))
    task = make_sft_task(model, adapted, pairs, tokenizer=tokenizer, max_length=options.max_length or recipe.max_length,
                         batch_size=config.batch_size, seed=options.seed, name=name, full_finetune=preset.full_finetune)
    results = run(task, config)
    generate = functools.partial(
        greedy_generate, model, svft_jax.merge(results["adapted"]), tokenizer=tokenizer, batch_size=options.eval_batch_size,
        max_prompt_length=options.max_prompt_length, max_new_tokens=options.max_new_tokens,
    )
    return results, config, generate
