"""Batched greedy / sampled decoding of a (SVFT-adapted) Flax causal LM with a KV cache.

    out = svft_jax.models.generate(model, adapted, [[1, 2, 3], [4, 5]], max_new_tokens=32)
    out.tokens      # (2, 32) int32: generated ids, pad_token_id after each row's stop token
    out.lengths     # (2,) tokens generated per row, the stop token included
    texts = svft_jax.models.generate_text(model, adapted, tokenizer, ["The capital of France is"])

One jitted decoding program per (model, batch, prompt length, max_new_tokens, greedy or
sampled, number of stop ids); temperature, top-k, top-p, stop and pad ids are traced values.
An adapted tree is merged by its own jitted program (`_merge_once`) before decoding starts:
the decoding program then sees plain parameters, exactly the program that merged params get
(no second compilation, no merge inside the loop); a plain parameter tree passes through
unchanged. The merged weights of the last adapted tree are kept (one entry, keyed on the
identity of its arrays, held by weak references): calling `generate` again with the same
adapted tree — an evaluation over many batches — merges once, not once per call. Only trees
whose arrays are all `jax.Array`s (immutable) are kept; a tree holding numpy arrays, which
could change in place, is merged on every call. The left-padded prompts run in one forward that fills the model's cache
(`init_cache` / `past_key_values`, as transformers' Flax `generate` uses it), then a
`lax.while_loop` feeds one token per step until every row has emitted a stop token or
`max_new_tokens` are done. Ragged prompts are left-padded: pad positions are masked out of
attention and positions count real tokens only (`cumsum(mask) - 1`), so a row's output does
not depend on the other rows of the batch.

Why not transformers' `model.generate`: it also runs on merged params, but its settings come
from the model's generation config and its params are not an argument of one jitted program;
here they are, so repeated calls (an evaluation inside a training loop, a new M each time)
reuse one compiled program.

Tested on Llama (`tests/test_generate.py`) and on SmolLM2 from GGUF; other transformers Flax
causal LMs with the same cache protocol (`init_cache`, `past_key_values`, `position_ids`:
Mistral, Gemma, GPT-J, GPT-Neo, GPT-2) should work unchanged but are not tested here.

Merging costs one dense d1·r·d2 product per target, once per call: for SmolLM2 with every
projection adapted that is ~58 G multiply-adds, ~7x the 64 decoding steps of batch 1 (~0.13 G
multiply-adds per token), so it is most of a short call's time
(`experiments/bench/generate.py` measures both). To decode many times with the same adapter,
merge once yourself and pass `svft_jax.merge(adapted)` (same tree structure as the base params:
no recompilation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["GenerationOutput", "generate", "generate_text", "left_pad"]


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """What `generate` returns (numpy arrays).

    Attributes:
      tokens: (B, max_new_tokens) int32 generated ids; after a row's stop token, pad_token_id.
      lengths: (B,) int32 number of generated tokens per row, its stop token included.
      stopped: (B,) bool, True where the row emitted a stop token.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray

    def sequences(self) -> list[list[int]]:
        """Each row's generated ids up to and including its stop token."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


_TEXT_HINT = "generate takes token ids: for strings use generate_text(model, params, tokenizer, texts, ...)"


def _check_integer_ids(ids: np.ndarray, caller: str, what: str) -> None:
    # Refused rather than cast: np.asarray(..., np.int32) truncates 5.7 to 5 without a word.
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{caller}: token ids must be integers; {what} has dtype {ids.dtype} "
                        "(pass the tokenizer's integer ids).")


def _token_lists(prompts, caller: str) -> list[np.ndarray]:
    """Ragged prompts as 1-D integer arrays, or a TypeError/ValueError saying what the caller passed instead."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"{caller}: prompts is one string; {_TEXT_HINT}, or tokenize first.")
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) != 2:
        raise TypeError(f"{caller}: a prompts array must be (B, T) token ids, got shape {np.shape(prompts)}; "
                        "pass ids[None] for one prompt, or a list of token-id lists.")
    if not isinstance(prompts, (Sequence, np.ndarray, jax.Array)) or not len(prompts):
        raise ValueError(f"{caller}: prompts must be a non-empty list of token-id lists, got {prompts!r}.")
    if any(isinstance(p, (str, bytes)) for p in prompts):
        raise TypeError(f"{caller}: prompts are strings; {_TEXT_HINT}.")
    if all(np.ndim(p) == 0 for p in prompts):
        shown = ", ".join(str(p) for p in list(prompts)[:8]) + (", ..." if len(prompts) > 8 else "")
        raise TypeError(f"{caller}: prompts must be a list of token-id lists (one per row), got one flat list of "
                        f"ids; pass [[{shown}]] for a single prompt.")
    arrays = []
    for row, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1:
            raise TypeError(f"{caller}: prompt {row} must be a list of token ids, got shape {ids.shape}.")
        if ids.size == 0:
            raise ValueError(f"{caller}: prompt {row} is empty; every prompt needs at least one token.")
        _check_integer_ids(ids, caller, f"prompt {row}")
        arrays.append(ids)
    return arrays


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad ragged token-id lists: ((B, T) int32 ids, (B, T) int32 attention mask), T = longest prompt.

    Raises:
      TypeError: text, a flat id list, or non-integer ids. ValueError: no prompt, or an empty one.
    """
    prompts = _token_lists(prompts, "left_pad")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = np.asarray(prompt, np.int32)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def _filter_logits(logits, temperature, top_k, top_p):
    """Temperature, then top-k, then top-p (nucleus) on (B, V) float32 logits; dropped entries are -inf.

    `top_k` = V and `top_p` = 1 disable the filters; all three are traced scalars, so changing
    them does not recompile.
    """
    logits = logits / temperature
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    kth = jax.lax.dynamic_index_in_dim(ordered, top_k - 1, axis=-1, keepdims=True)
    ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.take_along_axis(ordered, keep.sum(-1, keepdims=True) - 1, axis=-1)
    return jnp.where(logits < jnp.maximum(kth, threshold), -jnp.inf, logits)


def _empty_cache(model, batch: int, length: int):
    # Shapes only: `init_cache` runs a whole random-weight forward pass to find them.
    shapes = jax.eval_shape(lambda: model.init_cache(batch, length))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@jax.jit
def _merged(params):
    from svft_jax.core import merge

    return merge(params)


class _MergeCache:
    """The merged weights of the last adapted tree, keyed on its structure and the identity of
    its arrays (weak references: a key whose arrays were freed is never matched, so a recycled
    `id` cannot return stale weights). One entry, so at most one merged copy is held."""

    def __init__(self):
        self._refs, self._treedef, self._merged = (), None, None

    def get(self, leaves, treedef):
        if self._merged is None or treedef != self._treedef or len(leaves) != len(self._refs):
            return None
        if all(ref() is leaf for ref, leaf in zip(self._refs, leaves, strict=True)):
            return self._merged
        return None

    def put(self, leaves, treedef, merged) -> None:
        self._refs, self._treedef, self._merged = tuple(weakref.ref(leaf) for leaf in leaves), treedef, merged

    def clear(self) -> None:
        self._refs, self._treedef, self._merged = (), None, None


_MERGE_CACHE = _MergeCache()


def clear_merge_cache() -> None:
    """Drop the merged weights `generate` keeps for the last adapted tree (frees their memory)."""
    _MERGE_CACHE.clear()


def _merge_once(params):
    """The dense parameters `generate` decodes with: `svft_jax.merge(params)` run as one jitted
    program (compiled once per tree structure) when `params` holds adapter nodes or `Trainable`
    markers; a plain parameter tree is returned as it is.

    `generate` calls this before decoding, so the decoding loop never merges; the same adapted
    tree (the same jax arrays) passed again reuses the last merge (`_MergeCache`).
    """
    from svft_jax.core._protocol import is_special

    if not any(is_special(leaf) for leaf in jax.tree_util.tree_leaves(params, is_leaf=is_special)):
        return params
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if not all(isinstance(leaf, jax.Array) for leaf in leaves):  # numpy arrays can change in place
        return _merged(params)
    merged = _MERGE_CACHE.get(leaves, treedef)
    if merged is None:
        merged = _merged(params)
        _MERGE_CACHE.put(leaves, treedef, merged)
    return merged


# Known cost, kept on purpose: transformers' Flax attention builds a (max_position_embeddings)²
# causal mask each call; XLA hoists it out of the decoding loop and builds it whole (64 MiB,
# ~17-25 ms per call for SmolLM2). Disabling that hoisting (`compiler_options=
# {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}`) saves it, but would also stop
# hoisting a bfloat16-compute model's per-step weight casts out of the loop, re-casting every
# weight every step: a ~1 % gain for float32 models against up to ~2x for those.
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode(model, steps: int, sample: bool, params, ids, mask, stop, pad, temperature, top_k, top_p, rng):
    """(tokens (B, steps), done (B,)); static: the model, the step count and greedy vs sampled.
    `params` is a plain (merged) parameter tree."""
    batch, prompt_len = ids.shape
    full_mask = jnp.concatenate([mask, jnp.ones((batch, steps), mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    out = model(ids, attention_mask=full_mask, position_ids=positions, params=params,
                past_key_values=_empty_cache(model, batch, prompt_len + steps))
    next_position = positions[:, -1:] + 1

    def choose(logits, step):
        logits = logits.astype(jnp.float32)
        if not sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        filtered = _filter_logits(logits, temperature, top_k, top_p)
        return jax.random.categorical(jax.random.fold_in(rng, step), filtered, axis=-1).astype(jnp.int32)

    def cond(carry):
        step, _, _, _, done = carry
        return (step < steps) & ~jnp.all(done)

    def body(carry):
        step, tokens, cache, logits, done = carry
        token = jnp.where(done, pad, choose(logits, step))
        tokens = tokens.at[:, step].set(token)
        done = done | jnp.isin(token, stop)
        out = model(token[:, None], attention_mask=full_mask, position_ids=next_position + step, params=params,
                    past_key_values=cache)
        return step + 1, tokens, out.past_key_values, out.logits[:, -1], done

    tokens = jnp.full((batch, steps), pad, jnp.int32)
    done = jnp.zeros((batch,), bool)
    _, tokens, _, _, done = jax.lax.while_loop(cond, body, (0, tokens, out.past_key_values, out.logits[:, -1], done))
    return tokens, done


def _stop_ids(stop_token_id, config) -> tuple[int, ...]:
    if stop_token_id is None:
        stop_token_id = getattr(config, "eos_token_id", None)
    if stop_token_id is None:
        return ()
    ids = (stop_token_id,) if isinstance(stop_token_id, (int, np.integer)) else tuple(stop_token_id)
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < config.vocab_size for i in ids):
        raise ValueError(f"generate: stop_token_id must be token ids in [0, {config.vocab_size}), got {stop_token_id!r}.")
    return tuple(int(i) for i in ids)


def _real(name: str, value) -> float:
    """A Python / numpy / 0-d jax real scalar as a float (bools refused)."""
    if not isinstance(value, (bool, np.bool_)):
        if isinstance(value, (int, float, np.integer, np.floating)):
            return float(value)
        if (isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0
                and (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer))):
            return float(value)
    raise TypeError(f"generate: {name} must be a real number (Python, numpy or 0-d jax scalar), got {value!r}.")


def _integer(name: str, value) -> int | None:
    """A Python / numpy / 0-d jax integer as an int; None for anything else (bools included)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.integer):
        return int(value)
    return None


def _rng_key(rng):
    """One PRNG key from `rng`: a typed key, a legacy uint32 key, or an int seed (checked here, not inside jit)."""
    seed = _integer("rng", rng)
    if seed is not None:
        return jax.random.key(seed)
    if isinstance(rng, (np.ndarray, jax.Array)):
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.shape == ():
            return rng
        if rng.dtype == np.uint32 and rng.ndim == 1:
            return jnp.asarray(rng)  # jax.random.PRNGKey(seed)
    raise TypeError(f"generate: rng must be one key (jax.random.key(seed) or jax.random.PRNGKey(seed)) or an int "
                    f"seed, got {rng!r}.")


def _pad_id(pad_token_id, config, stop: tuple[int, ...]) -> int:
    """The pad id, checked and blamed on where it came from (the argument, the config, or the stop ids)."""
    if pad_token_id is not None:
        where, value = "pad_token_id", pad_token_id
    elif getattr(config, "pad_token_id", None) is not None:
        where, value = "config.pad_token_id", config.pad_token_id
    else:
        return stop[0] if stop else 0  # stop ids are checked against the vocabulary already
    pad = _integer(where, value)
    if pad is None:
        raise TypeError(f"generate: {where} must be an int token id, got {value!r}.")
    if not 0 <= pad < config.vocab_size:
        raise ValueError(f"generate: {where} = {pad} lies outside the vocabulary [0, {config.vocab_size}); pass "
                         "pad_token_id=<an id in range> (pad positions are masked out, so any id will do).")
    return pad


def generate(model, params, prompts, *, max_new_tokens: int, attention_mask=None, stop_token_id=None,
             pad_token_id: int | None = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, rng=None) -> GenerationOutput:
    """Decode up to `max_new_tokens` tokens after each prompt, greedily or by sampling.

    Args:
      model: a transformers Flax causal LM (e.g. from `load_pretrained`).
      params: its parameters, plain or SVFT/LoRA-adapted (merged before decoding; the merge of
        the last adapted tree is reused while the same jax arrays are passed again, so an
        evaluation loop merges once; `clear_merge_cache()` frees it).
      prompts: a list of token-id lists (ragged; left-padded here), or a (B, T) int array of
        left-padded ids with `attention_mask` (B, T) (1 = token, 0 = pad). Right padding is
        refused: the last prompt position must be a real token. Integer ids only (floats
        are refused, not truncated); for text use `generate_text`.
      max_new_tokens: decoding steps (≥ 1); T + max_new_tokens ≤ config.max_position_embeddings.
      stop_token_id: an id or ids that end a row (kept in the output); default the config's
        `eos_token_id`; `()` disables stopping.
      pad_token_id: written after a row stops and used for left padding, an id in the
        vocabulary; default the config's `pad_token_id`, else the first stop id, else 0.
      temperature: 0 for greedy (argmax); > 0 (finite) samples from softmax(logits / temperature).
        temperature, top_k and top_p may be Python, numpy or 0-d jax scalars.
      top_k: sample among the k most likely tokens only (k ≥ 1).
      top_p: sample from the smallest set of most likely tokens whose probability reaches p
        (0 < p ≤ 1); applied after top_k. Tokens tied at the threshold are all kept.
      rng: a `jax.random.key` (or legacy `PRNGKey`), or an int seed (= `jax.random.key(seed)`),
        required when temperature > 0; step i uses `fold_in(rng, i)`.
    Returns:
      A `GenerationOutput` (numpy tokens, lengths, stopped).
    Raises:
      ValueError / TypeError: bad prompts, settings, or a context longer than the model's.
    """
    config = model.config
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    stop = _stop_ids(stop_token_id, config)
    pad_token_id = _pad_id(pad_token_id, config, stop)
    temperature = _real("temperature", temperature)
    # NaN compares False both ways: unchecked it decoded greedily and ignored top_k / top_p.
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"generate: temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}.")
    if top_k is not None:
        k = _integer("top_k", top_k)
        if k is None:
            raise TypeError(f"generate: top_k must be an int (or None), got {top_k!r}.")
        if not 1 <= k <= config.vocab_size:
            raise ValueError(f"generate: top_k must be an int in [1, {config.vocab_size}] or None, got {top_k!r}.")
        top_k = k
    if top_p is not None:
        top_p = _real("top_p", top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"generate: top_p must be in (0, 1] or None, got {top_p!r}.")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError("generate: top_k / top_p apply to sampling; pass temperature > 0 (or drop them for greedy).")
    if temperature > 0 and rng is None:
        raise ValueError("generate: sampling (temperature > 0) needs rng=jax.random.key(seed) (or an int seed).")
    rng = _rng_key(jax.random.key(0) if rng is None else rng)

    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"generate: prompts is one string; {_TEXT_HINT}.")
    if attention_mask is None and not isinstance(prompts, np.ndarray | jax.Array):
        ids, mask = left_pad(_token_lists(prompts, "generate"), pad_token_id)
    else:
        ids = np.asarray(prompts)
        if ids.ndim != 2:
            raise TypeError(f"generate: a prompts array must be (B, T) token ids, got shape {ids.shape}; pass "
                            "ids[None] for one prompt (with attention_mask[None]), or a list of token-id lists.")
        _check_integer_ids(ids, "generate", "the prompts array")
        ids = ids.astype(np.int32)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"generate: prompts {ids.shape} and attention_mask {mask.shape} must be the same (B, T).")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("generate: attention_mask must hold only 0 (pad) and 1 (token).")
        mask = mask.astype(np.int32)
        if not np.all(np.diff(mask, axis=1) >= 0) or not mask[:, -1].all():
            raise ValueError("generate: attention_mask must be left padding (0s then 1s, last column 1); "
                             "tokenize with padding_side='left' or pass ragged token-id lists.")
    if np.any(ids < 0) or np.any(ids >= config.vocab_size):
        raise ValueError(f"generate: prompt ids must lie in [0, {config.vocab_size}).")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"generate: prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                         f"config.max_position_embeddings = {limit}.")
    # A -1 sentinel keeps the stop array's shape (1,) for "no stop" and one stop id: one compile.
    stop_array = jnp.asarray(stop or (-1,), jnp.int32)
    tokens, done = _decode(model, int(max_new_tokens), temperature > 0, _merge_once(params), jnp.asarray(ids), jnp.asarray(mask),
                           stop_array, jnp.int32(pad_token_id), jnp.float32(max(temperature, 1e-6)),
                           jnp.int32(config.vocab_size if top_k is None else top_k),
                           jnp.float32(1.0 if top_p is None else top_p), rng)
    tokens, done = np.asarray(tokens), np.asarray(done)
    is_stop = np.isin(tokens, np.asarray(stop or (-1,)))
    lengths = np.where(is_stop.any(1), is_stop.argmax(1) + 1, max_new_tokens).astype(np.int32)
    return GenerationOutput(tokens=tokens, lengths=lengths, stopped=done)


def generate_text(model, params, tokenizer, texts: Sequence[str], *, max_new_tokens: int,
                  skip_special_tokens: bool = True, **kwargs: Any) -> list[str]:
    """`generate` on tokenized `texts`, decoded to strings (the stop token dropped with the special tokens).

    `kwargs` go to `generate`; `stop_token_id` defaults to the tokenizer's eos, `pad_token_id` to its pad.
    """
    if isinstance(texts, str):
        raise TypeError("generate_text: texts must be a list of strings, not one string.")
    kwargs.setdefault("stop_token_id", tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    out = generate(model, params, prompts, max_new_tokens=max_new_tokens, **kwargs)
    return [tokenizer.decode(seq, skip_special_tokens=skip_special_tokens) for seq in out.sequences()]
