"""The harness's one data path: random-access sources (`tfds.data_source` over array_record
files, or any sequence) batched by `grain.MapDataset`, and the one rule for a ragged last batch.

Every task reads through these functions: the paper tasks (TFDS names, `load_source`), the
offline sentiment task (its own TFDS builder, `experiments.tasks.rotten_tomatoes`) and the tests
(`tfds.testing.mock_data`). Nothing here imports TensorFlow.

- `train_batches(source, transform, batch_size=, seed=, epoch=)`: one shuffled epoch of full
  batches (the partial last batch is dropped: the train step wants one shape).
- `eval_batches(source, transform, batch_size=)`: the whole source in order, every batch of
  exactly `batch_size` rows, the last one completed by `pad_rows` with a `valid` mask.
- `pad_rows(rows, batch_size)`: THE padding rule (repeat the last real example, mark the
  copies invalid); also used for the prompts of batched generation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np

# Builders whose modules tfds does not import eagerly when TensorFlow is absent; importing
# the module registers the builder name (e.g. 'glue', 'gsm8k', 'unified_qa').
_LAZY_BUILDER_MODULES = {
    "glue": "tensorflow_datasets.text.glue",
    "gsm8k": "tensorflow_datasets.text.gsm8k",
    "hellaswag": "tensorflow_datasets.text.hellaswag",
    "winogrande": "tensorflow_datasets.text.winogrande",
    "unified_qa": "tensorflow_datasets.text.unifiedqa",
}

# Seeds of different epochs are this far apart, so (seed, epoch) pairs never share a shuffle
# for seeds below it, and epoch 0 of seed s is grain's `shuffle(seed=s)` itself.
EPOCH_SEED_STRIDE = 1_000_003
VALID = "valid"


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
    import tensorflow_datasets as tfds

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


def shuffle_seed(seed: int, epoch: int) -> int:
    """The grain shuffle seed of `epoch` for a run seeded `seed` (epoch 0: `seed` itself)."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}.")
    return (seed + EPOCH_SEED_STRIDE * epoch) % 2**32


def train_batches(
    source: Sequence,
    transform: Callable[[object], dict],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
) -> grain.MapDataset:
    """One shuffled epoch of full training batches.

    The shuffle is seeded by `shuffle_seed(seed, epoch)`, so every epoch has its own order
    and a rerun sees the same data. The last partial batch is dropped (the train step wants
    a fixed shape).

    Args:
      source: random-access examples.
      transform: example -> dict of fixed-shape numpy arrays.
      batch_size: examples per batch.
      seed, epoch: run seed and epoch index.
    Returns:
      A grain MapDataset of dicts with a leading axis of `batch_size`.
    Raises:
      ValueError: if the source holds fewer than `batch_size` examples.
    """
    if len(source) < batch_size:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {len(source)} training examples; lower --config.batch_size."
        )
    return (
        grain.MapDataset.source(source)
        .shuffle(seed=shuffle_seed(seed, epoch))
        .map(transform)
        .batch(batch_size, drop_remainder=True, batch_fn=stack_examples)
    )


def pad_rows(rows: Sequence, batch_size: int) -> tuple[list, np.ndarray]:
    """The one padding rule for a ragged last batch.

    The rows are completed to `batch_size` by repeating the last real row (a real example
    keeps every model's numerics ordinary, unlike all-zero inputs), and a mask marks which
    rows are real, so metrics skip the copies. One fixed shape keeps one compiled step and
    lets a batch shard evenly over devices.

    Args:
      rows: 1 ≤ len(rows) ≤ batch_size examples (any objects: dicts of arrays, prompts).
      batch_size: the batch size to reach.
    Returns:
      (rows padded to `batch_size`, valid (batch_size,) bool, True on the real rows).
    """
    if not 1 <= len(rows) <= batch_size:
        raise ValueError(f"pad_rows needs 1 to batch_size={batch_size} rows, got {len(rows)}.")
    valid = np.arange(batch_size) < len(rows)
    return list(rows) + [rows[-1]] * (batch_size - len(rows)), valid


def eval_batches(
    source: Sequence, transform: Callable[[object], dict], *, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """All of `source` in order, in batches of exactly `batch_size` (the last one `pad_rows`-ed).

    Every batch carries `valid` (B,) bool marking the real examples: metrics must weight by
    it (see `masked_mean` and `concat_valid`).
    """
    if len(source) == 0:
        raise ValueError("the evaluation source is empty.")
    dataset = grain.MapDataset.source(source).map(transform).batch(batch_size, batch_fn=list)
    for examples in dataset:
        examples, valid = pad_rows(examples, batch_size)
        batch = stack_examples(examples)
        batch[VALID] = valid
        yield batch


def concat_valid(outputs: Sequence[dict], *keys: str) -> list[np.ndarray]:
    """Concatenate per-example arrays from metric outputs, dropping padded (`valid` False) rows."""
    valid = np.concatenate([np.asarray(o[VALID], bool) for o in outputs])
    return [np.concatenate([np.asarray(o[key]) for o in outputs])[valid] for key in keys]


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
