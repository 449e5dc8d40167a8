"""GLUE with SVFT (paper Table 3): SST-2, MRPC, CoLA, QNLI, RTE, STS-B, MNLI, QQP.

Substitution: the paper fine-tunes DeBERTaV3-base, which has no Flax implementation in
`transformers`; this script uses RoBERTa-base (`FacebookAI/roberta-base`, Flax weights on the
hub) by default and any Flax sequence classifier (e.g. `google-bert/bert-base-uncased`) via
`--model`. Numbers are therefore comparable in trend, not in value, with the paper's table.

Metrics (GLUE convention, on the validation split since test labels are hidden): accuracy
(SST-2, MRPC, QNLI, RTE, MNLI matched + mismatched, QQP; F1 too for MRPC/QQP), Matthews
correlation (CoLA), Pearson correlation (STS-B, a 1-output regression head).

Full run (one task; data from `tfds build glue/<task> --file_format=array_record`):

    python -m experiments.paper.glue --task=sst2 --method=svft_banded_d2 \
        --model=FacebookAI/roberta-base --output_dir=runs/glue/sst2/svft_banded_d2

Smoke run on a tiny random model (what the tests do, under `tfds.testing.mock_data`):

    python -m experiments.paper.glue --task=cola --model=tiny --config.steps=3 --config.batch_size=8   # inside mock_data

Writes `metrics.json` (validation metrics of the best checkpoint, parameter counts, config) to
`--output_dir`, next to the driver's logs.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from experiments.harness import data, models
from experiments.harness.text import ByteTokenizer, load_tokenizer, pad_to
from experiments.harness.train import Task, evaluate_model, run
from experiments.paper import common
from experiments.paper.configs import GLUE, GLUE_EPOCHS, GLUE_MAX_LENGTH
from svft_jax.training import losses


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """One GLUE task: TFDS config, text fields, label count (1 = regression), main metric."""

    tfds_name: str
    text_keys: tuple[str, str | None]
    num_labels: int
    metric: str
    eval_split: str = "validation"
    extra_eval_splits: tuple[str, ...] = ()


GLUE_TASKS = {
    "cola": GlueTask("glue/cola", ("sentence", None), 2, "mcc"),
    "sst2": GlueTask("glue/sst2", ("sentence", None), 2, "accuracy"),
    "mrpc": GlueTask("glue/mrpc", ("sentence1", "sentence2"), 2, "accuracy"),
    "qqp": GlueTask("glue/qqp", ("question1", "question2"), 2, "accuracy"),
    "stsb": GlueTask("glue/stsb", ("sentence1", "sentence2"), 1, "pearson"),
    "mnli": GlueTask("glue/mnli", ("premise", "hypothesis"), 3, "accuracy", "validation_matched", ("validation_mismatched",)),
    "qnli": GlueTask("glue/qnli", ("question", "sentence"), 2, "accuracy"),
    "rte": GlueTask("glue/rte", ("sentence1", "sentence2"), 2, "accuracy"),
}


# --- metrics ------------------------------------------------------------------------------
def accuracy(labels, predictions) -> float:
    """Fraction of predictions equal to labels."""
    return float(np.mean(np.asarray(labels) == np.asarray(predictions)))


def matthews_corrcoef(labels, predictions) -> float:
    """Matthews correlation coefficient (multi-class form of Gorodkin 2004; binary MCC for 2 classes).

    MCC = (c·s − Σ_k p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)) with c correct predictions,
    s samples, p_k / t_k predicted / true counts of class k. 0 when a factor is 0 (constant
    predictions or labels), as scikit-learn does.
    """
    labels, predictions = np.asarray(labels).astype(np.int64), np.asarray(predictions).astype(np.int64)
    classes = np.union1d(labels, predictions)
    t = np.array([(labels == k).sum() for k in classes], np.float64)
    p = np.array([(predictions == k).sum() for k in classes], np.float64)
    s, c = float(labels.size), float((labels == predictions).sum())
    denominator = np.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return 0.0 if denominator == 0 else float((c * s - (p * t).sum()) / denominator)


def pearson(x, y) -> float:
    """Pearson correlation of two 1-D arrays (0 if either is constant)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return 0.0 if denominator == 0 else float((x * y).sum() / denominator)


def binary_f1(labels, predictions) -> float:
    """F1 of the positive class (label 1)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    tp = float(((predictions == 1) & (labels == 1)).sum())
    fp = float(((predictions == 1) & (labels != 1)).sum())
    fn = float(((predictions != 1) & (labels == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def task_metrics(task: GlueTask, labels, predictions) -> dict[str, float]:
    """The task's GLUE metrics from per-example labels and predictions."""
    if task.metric == "pearson":
        return {"pearson": pearson(predictions, labels)}
    metrics = {"accuracy": accuracy(labels, predictions)}
    if task.metric == "mcc":
        metrics["mcc"] = matthews_corrcoef(labels, predictions)
    if task.tfds_name in ("glue/mrpc", "glue/qqp"):
        metrics["f1"] = binary_f1(labels, predictions)
    return metrics


# --- model ----------------------------------------------------------------------------------
def tiny_model(num_labels: int, max_length: int):
    """A 1-layer random RoBERTa classifier over ByteTokenizer ids (tests; nothing downloaded)."""
    from transformers import FlaxRobertaForSequenceClassification, RobertaConfig

    tokenizer = ByteTokenizer()
    config = RobertaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=max_length + 4, pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, num_labels=num_labels,
    )
    model, params = models.init_tiny(FlaxRobertaForSequenceClassification, config, (1, max_length))
    return model, params, tokenizer


def load_model(name: str, num_labels: int, max_length: int):
    """(Flax sequence classifier, params, tokenizer): `from_pretrained(name)` or the tiny test model."""
    if name == "tiny":
        return tiny_model(num_labels, max_length)
    from transformers import FlaxAutoModelForSequenceClassification

    model = FlaxAutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels)
    return model, model.params, load_tokenizer(name)


def encode_example(example: dict, *, task: GlueTask, tokenizer, max_length: int) -> dict[str, np.ndarray]:
    """Tokenise one GLUE example into fixed-length arrays."""
    first_key, second_key = task.text_keys
    first = data.as_text(example[first_key])
    second = data.as_text(example[second_key]) if second_key else None
    ids, mask = pad_to(tokenizer.encode_pair(first, second, max_length), max_length, tokenizer.pad_id)
    label_dtype = np.float32 if task.num_labels == 1 else np.int32
    return {"input_ids": ids, "attention_mask": mask, "label": np.asarray(example["label"], label_dtype)}


def make_task(model, task: GlueTask, adapted, train_source, eval_source, *, tokenizer, max_length, batch_size, seed, extra,
              full_finetune=False):
    """The driver's Task: loss/metric functions over the adapted tree (`models.run_adapted`), grain data."""
    encode = functools.partial(encode_example, task=task, tokenizer=tokenizer, max_length=max_length)

    run_model = models.run_adapted(model)  # the adapted tree, never a merged copy

    def logits_of(adapted, batch, rng=None):
        train_mode = rng is not None
        return run_model(
            batch["input_ids"], batch["attention_mask"], params=adapted,
            dropout_rng=rng, train=train_mode,
        ).logits

    def loss_fn(adapted, batch, rng):
        logits = logits_of(adapted, batch, rng)
        if task.num_labels == 1:
            return losses.regression_loss(logits[:, 0], batch["label"])
        return losses.classification_loss(logits, batch["label"])

    def metric_fn(adapted, batch):
        logits = logits_of(adapted, batch)
        prediction = logits[:, 0] if task.num_labels == 1 else jnp.argmax(logits, axis=-1)
        return {"prediction": prediction, "label": batch["label"], "valid": batch["valid"]}

    def aggregate_fn(outputs):
        labels, predictions = data.concat_valid(outputs, "label", "prediction")
        return task_metrics(task, labels, predictions)

    return Task(
        adapted=adapted,
        loss_fn=loss_fn,
        train_data=lambda epoch: data.train_batches(train_source, encode, batch_size=batch_size, seed=seed, epoch=epoch),
        eval_data=lambda: data.eval_batches(eval_source, encode, batch_size=batch_size),
        metric_fn=metric_fn,
        aggregate_fn=aggregate_fn,
        extra=extra,
        full_finetune=full_finetune,
        count_tokens=lambda batch: int(np.sum(batch["attention_mask"])),
        name=f"glue/{task.tfds_name.split('/')[-1]}",
    )


@dataclasses.dataclass(frozen=True)
class Options(common.PaperOptions):
    """GLUE flags (besides the shared ones of `PaperOptions` and the driver's `--config.*`).

    Attributes:
      task: one of GLUE_TASKS (required; None only as the parse's starting point).
      max_length: tokens per example (None: the per-task paper value).
      max_train_examples, max_eval_examples: use only the first N examples.
    """

    task: str | None = None
    max_length: int | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.task is not None and self.task not in GLUE_TASKS:
            raise ValueError(f"--task={self.task!r}: choose one of {sorted(GLUE_TASKS)}.")


def main(argv: Sequence[str] | None = None) -> dict:
    """Fine-tune on one GLUE task and write metrics.json. Returns the metrics dict."""
    options, config, given = common.setup(argv, Options(), GLUE, __doc__)
    if options.task is None:
        raise ValueError(f"--task is required: one of {sorted(GLUE_TASKS)}.")
    preset = options.preset
    task = GLUE_TASKS[options.task]
    max_length = options.max_length or (min(GLUE_MAX_LENGTH[options.task], 64) if options.model == "tiny" else GLUE_MAX_LENGTH[options.task])

    load = functools.partial(data.load_source, data_dir=options.data_dir, download=options.download)
    train_source = data.limit(load(task.tfds_name, "train"), options.max_train_examples)
    eval_sources = {split: data.limit(load(task.tfds_name, split), options.max_eval_examples) for split in (task.eval_split, *task.extra_eval_splits)}

    model, params, tokenizer = load_model(options.model, task.num_labels, max_length)
    adapted = preset.adapt(params, targets=options.targets or GLUE.targets_for(preset), seed=options.seed)
    config = common.with_steps(config, given, epochs=options.epochs or GLUE_EPOCHS[options.task], num_examples=len(train_source))
    config = dataclasses.replace(config, selection_metric=task.metric, selection_mode="max")
    glue_task = make_task(
        model, task, adapted, train_source, eval_sources[task.eval_split], tokenizer=tokenizer,
        max_length=max_length, batch_size=config.batch_size, seed=options.seed, extra=GLUE.extra,
        full_finetune=preset.full_finetune,
    )
    results = run(glue_task, config)

    encode = functools.partial(encode_example, task=task, tokenizer=tokenizer, max_length=max_length)
    metrics = {"task": options.task, "model": options.model, "method": preset.name, "metric": task.metric}
    metrics[task.eval_split] = results["best_eval"]  # the driver already evaluated the best checkpoint
    for split in task.extra_eval_splits:
        batches = data.eval_batches(eval_sources[split], encode, batch_size=config.batch_size)
        metrics[split] = evaluate_model(glue_task, results["adapted"], batches)
    metrics["score"] = metrics[task.eval_split][task.metric]
    metrics.update(common.run_summary(results["adapted"], glue_task.trainable_filter, results, config))
    common.write_metrics(options.output_dir, metrics, overwrite=options.overwrite)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
