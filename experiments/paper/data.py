"""Data plumbing shared by the paper scripts: TFDS array_record sources and grain batching.

Everything reads through `tfds.data_source` (random access over array_record files; no
TensorFlow needed) and batches with `grain.MapDataset`, so a run on a user's machine only needs
`tfds build <name> --file_format=array_record` (or a data_dir that already holds the files).
Tests swap the files for `tfds.testing.mock_data`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

# Builders whose modules tfds does not import eagerly when TensorFlow is absent; importing
# the module registers the builder name (e.g. 'glue', 'gsm8k', 'unified_qa').
_LAZY_BUILDER_MODULES = {
    "glue": "tensorflow_datasets.text.glue",
    "gsm8k": "tensorflow_datasets.text.gsm8k",
    "hellaswag": "tensorflow_datasets.text.hellaswag",
    "winogrande": "tensorflow_datasets.text.winogrande",
    "unified_qa": "tensorflow_datasets.text.unifiedqa",
}


def load_source(name: str, split: str, *, data_dir: str | None = None, download: bool = False) -> Sequence[dict]:
    """Random-access source of decoded examples: `tfds.data_source(name, split=split)`.

    Args:
      name: TFDS name with config, e.g. 'glue/sst2', 'cifar100', 'ai2_arc/ARC-Easy'.
      split: split spec, slicing allowed ('train[:80%]').
      data_dir: TFDS data directory (None: TFDS's default, ~/tensorflow_datasets).
      download: let TFDS download and build missing data (needs network).
    Returns:
      A sequence; `source[i]` is a dict of numpy values / str / bytes.
    """
    module = _LAZY_BUILDER_MODULES.get(name.split("/")[0])
    if module is not None:
        importlib.import_module(module)
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download)


def as_text(value) -> str:
    """A TFDS Text feature as str (array_record gives bytes, mocks give str)."""
    if isinstance(value, bytes | np.bytes_):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return as_text(value.item())
    return str(value)


def stack_examples(examples: Sequence[dict]) -> dict[str, np.ndarray]:
    """Stack a list of same-keyed dicts of arrays into a dict of batched arrays."""
    return {key: np.stack([np.asarray(example[key]) for example in examples]) for key in examples[0]}


def train_batches(
    source: Sequence,
    transform: Callable[[object], dict],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
) -> grain.MapDataset:
    """One shuffled epoch of full training batches.

    The shuffle is seeded by (seed, epoch), so every epoch has its own order and a rerun sees
    the same data. The last partial batch is dropped (the train step wants a fixed shape).

    Args:
      source: random-access examples.
      transform: example -> dict of fixed-shape numpy arrays.
      batch_size: examples per batch.
      seed, epoch: shuffle seed and epoch index.
    Returns:
      A grain MapDataset of dicts with a leading axis of `batch_size`.
    """
    if len(source) < batch_size:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {len(source)} training examples; lower --config.batch_size."
        )
    return (
        grain.MapDataset.source(source)
        .shuffle(seed=seed * 1_000_003 + epoch)
        .map(transform)
        .batch(batch_size, drop_remainder=True, batch_fn=stack_examples)
    )


def eval_batches(
    source: Sequence, transform: Callable[[object], dict], *, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """All of `source` in order, in batches of exactly `batch_size`.

    The last batch is padded by repeating its final example; a `valid` (B,) bool array marks
    the real examples so metrics skip the padding. (A fixed shape keeps one compiled eval step
    and lets the batch shard evenly over devices.)
    """
    dataset = grain.MapDataset.source(source).map(transform).batch(batch_size, batch_fn=list)
    for examples in dataset:
        valid = np.zeros(batch_size, bool)
        valid[: len(examples)] = True
        examples = list(examples) + [examples[-1]] * (batch_size - len(examples))
        batch = stack_examples(examples)
        batch["valid"] = valid
        yield batch


def limit(source: Sequence, max_examples: int | None) -> Sequence:
    """The first `max_examples` of `source` (all when None)."""
    if max_examples is None or max_examples >= len(source):
        return source
    return grain.MapDataset.source(source).slice(slice(0, max_examples))


def sample_per_class(
    label_of: Callable[[int], int],
    size: int,
    num_classes: int,
    counts: Sequence[int],
    *,
    seed: int,
) -> list[np.ndarray]:
    """Deterministic class-balanced subsets: exactly `counts[j]` examples of every class per subset.

    Walks the indices in a seeded random order and gives each example to the first subset whose
    quota for its class is still open (the rule of the authors' `sampled_balanced_train_val`,
    made reproducible). Stops as soon as every quota is filled, so only a fraction of a large
    dataset's labels are read.

    Args:
      label_of: index -> int class label in [0, num_classes).
      size: number of examples in the source.
      num_classes: number of classes C.
      counts: per-class quota of each subset, e.g. (10, 2) for train/validation.
      seed: seed of the walk order.
    Returns:
      One int64 index array per subset, of length C * counts[j], sorted ascending.
    Raises:
      ValueError: if some class has fewer than sum(counts) examples, naming it.
    """
    if any(count < 0 for count in counts):
        raise ValueError(f"counts must be non-negative, got {tuple(counts)}.")
    quota = np.array(counts, np.int64)
    filled = np.zeros((num_classes, len(counts)), np.int64)
    chosen: list[list[int]] = [[] for _ in counts]
    open_classes = num_classes if quota.sum() else 0
    for index in np.random.default_rng(seed).permutation(size):
        if open_classes == 0:
            break
        label = int(label_of(int(index)))
        if not 0 <= label < num_classes:
            raise ValueError(f"example {index} has label {label}, outside [0, {num_classes}).")
        for subset, count in enumerate(quota):
            if filled[label, subset] < count:
                filled[label, subset] += 1
                chosen[subset].append(int(index))
                if (filled[label] == quota).all():
                    open_classes -= 1
                break
    short = np.flatnonzero((filled < quota).any(axis=1))
    if short.size:
        raise ValueError(
            f"classes {short[:10].tolist()} have fewer than {int(quota.sum())} examples "
            f"(needed {tuple(counts)} per class); lower the per-class counts."
        )
    return [np.sort(np.array(indices, np.int64)) for indices in chosen]


class Subset(Sequence):
    """`source` restricted to `indices` (a random-access view, nothing copied)."""

    def __init__(self, source: Sequence, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]
