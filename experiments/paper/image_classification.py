"""Few-shot image classification with SVFT on ViT (paper Table 5).

ViT-B/16 or ViT-L/16 (ImageNet-21k checkpoints, `FlaxViTForImageClassification` with a new
head) on CIFAR-100, Flowers102, Food101 and RESISC45. As in the authors' code, 10 training and
2 validation images per class are drawn (deterministically, seeded), the projections the
authors adapt with each method are adapted (query+value for VeRA and SVFT^P, all six for LoRA,
DoRA and SVFT^B: `experiments.harness.presets`), the classifier head is trained at its own learning rate, the best
epoch on the validation images is kept and the full test set is scored.

Splits (TFDS names): cifar100 train→sample / test; food101 train→sample / validation (its only
held-out split); oxford_flowers102 train→10 per class, validation→2 per class / test (its train
split has exactly 10 per class); resisc45 has only a train split in TFDS, so train[:80%]→sample
and train[80%:]→test (the authors used timm's own train/val/test split).

Full run (data from `tfds build cifar100 --file_format=array_record`):

    python -m experiments.paper.image_classification --dataset=cifar100 --model=vit-base \
        --method=svft_banded_d2 --output_dir=runs/vit/cifar100/svft_banded_d2

Smoke run (tests, under mock_data): `--model=tiny --train_per_class=1 --val_per_class=1 --config.steps=2`.
Writes `metrics.json` (best validation accuracy, test accuracy, parameter counts, config) and
prints the adapter's trainable parameters beside the paper's count for that method.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

import svft_jax
from experiments.harness import data, models
from experiments.harness.train import Task, evaluate_model, run
from experiments.paper import common
from experiments.paper.configs import (
    TRAIN_PER_CLASS,
    VAL_PER_CLASS,
    VISION,
    VISION_MODELS,
    VISION_PAPER_COUNTS,
)
from svft_jax.training import losses


@dataclasses.dataclass(frozen=True)
class VisionDataset:
    """TFDS name, class count, and where the few-shot pools and the test set come from."""

    tfds_name: str
    num_classes: int
    train_pool: str
    val_pool: str | None  # None: train and validation are both drawn from train_pool
    test_split: str


DATASETS = {
    "cifar100": VisionDataset("cifar100", 100, "train", None, "test"),
    "food101": VisionDataset("food101", 101, "train", None, "validation"),
    "flowers102": VisionDataset("oxford_flowers102", 102, "train", "validation", "test"),
    "resisc45": VisionDataset("resisc45", 45, "train[:80%]", None, "train[80%:]"),
}


def few_shot_splits(pools: dict[str, Sequence], dataset: VisionDataset, *, train_per_class: int, val_per_class: int, seed: int):
    """(train, validation) views with exactly `train_per_class` / `val_per_class` images per class."""
    label_of = lambda source: lambda i: int(source[i]["label"])  # noqa: E731
    train_pool = pools["train"]
    if dataset.val_pool is None:
        train_idx, val_idx = data.sample_per_class(
            label_of(train_pool), len(train_pool), dataset.num_classes, (train_per_class, val_per_class), seed=seed
        )
        return data.Subset(train_pool, train_idx), data.Subset(train_pool, val_idx)
    val_pool = pools["validation"]
    (train_idx,) = data.sample_per_class(label_of(train_pool), len(train_pool), dataset.num_classes, (train_per_class,), seed=seed)
    (val_idx,) = data.sample_per_class(label_of(val_pool), len(val_pool), dataset.num_classes, (val_per_class,), seed=seed + 1)
    return data.Subset(train_pool, train_idx), data.Subset(val_pool, val_idx)


def preprocess(example: dict, *, image_size: int, mean: float = 0.5, std: float = 0.5) -> dict[str, np.ndarray]:
    """Resize to image_size² (bilinear), scale to [0, 1], normalise, channels first.

    The in21k ViT processors use mean = std = 0.5 per channel. Returns pixel_values
    (3, image_size, image_size) float32 and label () int32.
    """
    image = np.asarray(example["image"])
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    resized = np.asarray(Image.fromarray(image.astype(np.uint8)).resize((image_size, image_size), Image.BILINEAR), np.float32)
    pixels = (resized / 255.0 - mean) / std
    return {"pixel_values": np.transpose(pixels, (2, 0, 1)), "label": np.asarray(example["label"], np.int32)}


def load_model(name: str, num_classes: int):
    """(FlaxViTForImageClassification, params, image size): from_pretrained with a fresh head, or tiny."""
    from transformers import FlaxViTForImageClassification, ViTConfig

    if name == "tiny":
        config = ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, num_labels=num_classes,
        )
        model, params = models.init_tiny(FlaxViTForImageClassification, config, (1, 32, 32, 3))  # init takes NHWC; __call__ takes NCHW
        return model, params, 32
    model = FlaxViTForImageClassification.from_pretrained(
        VISION_MODELS.get(name, name), num_labels=num_classes, ignore_mismatched_sizes=True
    )
    return model, model.params, model.config.image_size


def make_task(model, adapted, train_set, val_set, *, image_size, batch_size, seed, extra, full_finetune=False):
    """The driver's Task for few-shot classification."""
    transform = functools.partial(preprocess, image_size=image_size)

    run_model = models.run_adapted(model)  # the adapted tree, never a merged copy

    def logits_of(adapted, batch, rng=None):
        return run_model(batch["pixel_values"], params=adapted, dropout_rng=rng, train=rng is not None).logits

    def loss_fn(adapted, batch, rng):
        return losses.classification_loss(logits_of(adapted, batch, rng), batch["label"])

    def metric_fn(adapted, batch):
        return {"prediction": jnp.argmax(logits_of(adapted, batch), -1), "label": batch["label"], "valid": batch["valid"]}

    def aggregate_fn(outputs):
        labels, predictions = data.concat_valid(outputs, "label", "prediction")
        return {"accuracy": float(np.mean(labels == predictions))}

    return Task(
        adapted=adapted,
        loss_fn=loss_fn,
        train_data=lambda epoch: data.train_batches(train_set, transform, batch_size=batch_size, seed=seed, epoch=epoch),
        eval_data=lambda: data.eval_batches(val_set, transform, batch_size=batch_size),
        metric_fn=metric_fn,
        aggregate_fn=aggregate_fn,
        extra=extra,
        full_finetune=full_finetune,
        name="vit",
    )


@dataclasses.dataclass(frozen=True)
class Options(common.PaperOptions):
    """ViT flags (besides the shared ones of `PaperOptions` and the driver's `--config.*`).

    Attributes:
      dataset: one of DATASETS (required).
      train_per_class, val_per_class: few-shot images per class.
      max_test_examples: score only the first N test images.
    """

    dataset: str | None = None
    train_per_class: int = TRAIN_PER_CLASS
    val_per_class: int = VAL_PER_CLASS
    max_test_examples: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ValueError(f"--dataset={self.dataset!r}: choose one of {sorted(DATASETS)}.")


def parameter_counts(adapted, preset, model_name: str) -> dict:
    """Our trainable adapter parameters (head excluded) beside the paper's count for the method."""
    ours = svft_jax.count_parameters(adapted)["trainable"]
    short = next((key for key, name in VISION_MODELS.items() if model_name in (key, name)), model_name)
    paper = VISION_PAPER_COUNTS.get(short, {}).get(preset.name)
    return {"method": preset.name, "scope": preset.scope, "ours": int(ours), "paper": paper}


def main(argv: Sequence[str] | None = None) -> dict:
    """Few-shot fine-tune a ViT on one dataset and write metrics.json. Returns the metrics dict."""
    options, config, given = common.setup(argv, Options(), VISION, __doc__, selection_metric="accuracy", selection_mode="max")
    if options.dataset is None:
        raise ValueError(f"--dataset is required: one of {sorted(DATASETS)}.")
    preset = options.preset
    dataset = DATASETS[options.dataset]

    load = functools.partial(data.load_source, dataset.tfds_name, data_dir=options.data_dir, download=options.download)
    pools = {"train": load(dataset.train_pool)}
    if dataset.val_pool is not None:
        pools["validation"] = load(dataset.val_pool)
    train_set, val_set = few_shot_splits(pools, dataset, train_per_class=options.train_per_class,
                                         val_per_class=options.val_per_class, seed=options.seed)
    test_set = data.limit(load(dataset.test_split), options.max_test_examples)

    model, params, image_size = load_model(options.model, dataset.num_classes)
    adapted = preset.adapt(params, targets=options.targets or VISION.targets_for(preset), seed=options.seed)
    counts = parameter_counts(adapted, preset, options.model)
    print(f"{preset.name} ({counts['scope']} projections): {counts['ours']:,} trainable adapter parameters; "
          f"paper (ViT-B, Table 5): {counts['paper'] or '—'}", flush=True)
    config = common.with_steps(config, given, epochs=options.epochs or VISION.epochs, num_examples=len(train_set))
    if "eval_every" not in given:  # once per epoch, as the authors' Trainer
        config = dataclasses.replace(config, eval_every=max(1, len(train_set) // config.batch_size))
    task = make_task(model, adapted, train_set, val_set, image_size=image_size, batch_size=config.batch_size,
                     seed=options.seed, extra=VISION.extra, full_finetune=preset.full_finetune)
    results = run(task, config)

    test_batches = data.eval_batches(test_set, functools.partial(preprocess, image_size=image_size), batch_size=config.batch_size)
    metrics = {
        "dataset": options.dataset, "model": options.model, "method": preset.name,
        "train_examples": len(train_set), "validation_examples": len(val_set), "test_examples": len(test_set),
        "validation": results["best_eval"],
        "test": evaluate_model(task, results["adapted"], test_batches),
        "adapter_parameters_vs_paper": counts,
    }
    metrics["score"] = metrics["test"]["accuracy"]
    metrics.update(common.run_summary(results["adapted"], task.trainable_filter, results, config))
    common.write_metrics(options.output_dir, metrics, overwrite=options.overwrite)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
