"""Paper reproduction tasks (experiments/paper): metrics, answer extraction, few-shot
sampling, per-method targets, and every task end to end on `tfds.testing.mock_data` with a tiny
random model.

End-to-end truths: on GLUE mock data whose label is carried by the sentence, the trained
model's validation MCC is far above the majority-class predictor's 0; the causal-LM tasks'
training loss falls, and their reported accuracies equal a recount of the decoded samples;
the ViT task adapts exactly the projections the paper uses with each method (counts from the
shapes), and on ViT-B shapes those targets give the paper's parameter counts."""

import json
import math

import jax
import numpy as np
import pytest
import scipy.stats
import tensorflow_datasets as tfds

import svft_jax
from experiments.harness import data, presets
from experiments.paper import commonsense, configs, glue, math_reasoning
from experiments.paper import image_classification as vision
from tests.stack import needs_flax_models


# --- metrics against independent formulas -------------------------------------------------
def test_mcc_matches_binary_confusion_matrix_formula(rng):
    labels, predictions = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    tp = np.sum((predictions == 1) & (labels == 1))
    tn = np.sum((predictions == 0) & (labels == 0))
    fp = np.sum((predictions == 1) & (labels == 0))
    fn = np.sum((predictions == 0) & (labels == 1))
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert glue.matthews_corrcoef(labels, predictions) == pytest.approx(expected, abs=1e-12)


def test_mcc_perfect_inverse_and_constant_predictions():
    labels = np.array([0, 1, 1, 0, 1])
    assert glue.matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert glue.matthews_corrcoef(labels, 1 - labels) == pytest.approx(-1.0)
    assert glue.matthews_corrcoef(labels, np.ones_like(labels)) == 0.0  # undefined -> 0 (sklearn's rule)


def test_pearson_matches_scipy_and_numpy(rng):
    x = rng.normal(size=100)
    y = 0.3 * x + rng.normal(size=100)
    assert glue.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert glue.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)


def test_binary_f1_matches_precision_recall_definition():
    labels = np.array([1, 1, 1, 0, 0, 1, 0])
    predictions = np.array([1, 0, 1, 1, 0, 1, 0])
    precision, recall = 3 / 4, 3 / 4
    assert glue.binary_f1(labels, predictions) == pytest.approx(2 * precision * recall / (precision + recall))


# --- answer extraction ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("She pays 3 * 4 = 12 dollars.\nThe answer is: 12", 12.0),
        ("The answer is: $1,234.50.", 1234.5),
        ("First 5 apples, then 7 more, so 12 in total... wait, it is -3", -3.0),
        ("The answer is: 3/4", 0.75),
        ("no digits here", None),
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert math_reasoning.extract_gsm8k_answer(text) == expected


def test_gsm8k_reference_and_metamath_rewrite():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert math_reasoning.gsm8k_reference(answer) == 72.0
    rewritten = math_reasoning.gsm8k_to_metamath(answer)
    assert "<<" not in rewritten and rewritten.endswith("The answer is: 72")
    assert math_reasoning.extract_gsm8k_answer(rewritten) == 72.0
    with pytest.raises(ValueError, match="####"):
        math_reasoning.gsm8k_reference("no marker 5")


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{3} first, finally \boxed{\sqrt{2}+{1}}", r"\sqrt{2}+{1}"),
        (r"\fbox{7}", "7"),
        ("The answer is: 12\nDone", "12"),
        ("nothing", None),
    ],
)
def test_extract_math_answer_last_boxed_with_nested_braces(text, expected):
    assert math_reasoning.extract_math_answer(text) == expected


def test_math_answer_normalisation():
    assert math_reasoning.math_answers_match(r"\dfrac{1}{2}", r"\frac12")
    assert math_reasoning.math_answers_match(r"\left( 3, 4 \right)", "(3,4)")
    assert math_reasoning.math_answers_match(r"90^\circ", "90")
    assert math_reasoning.math_answers_match(r"\text{(B)}", "(B)")
    assert not math_reasoning.math_answers_match("3", "4")
    assert not math_reasoning.math_answers_match(None, "4")


def test_extract_choice_first_whole_word():
    answers = commonsense.TASKS["arc_e"].answers
    assert commonsense.extract_choice("the correct answer is answer3", answers) == "answer3"
    assert commonsense.extract_choice("Answer2, not answer1", answers) == "answer2"
    assert commonsense.extract_choice("answer10 is not an option", answers) is None
    assert commonsense.extract_choice("the correct answer is true", ("true", "false")) == "true"


def test_siqa_unifiedqa_input_parsed_into_options():
    text = "what will sasha want to do next? \\n (A) go home (B) eat lunch (C) cry \\n sasha was hungry after class."
    question, options, label = commonsense.parse_unifiedqa_siqa(text, "eat lunch")
    assert options == ["go home", "eat lunch", "cry"] and label == 1
    assert question.startswith("sasha was hungry") and question.endswith("next?")
    with pytest.raises(ValueError, match="none of the options"):
        commonsense.parse_unifiedqa_siqa(text, "sleep")


def test_method_presets_parse_and_reject_unknown():
    assert presets.get("svft_banded_d2").kwargs == {"pattern": "banded", "d": 2}
    assert presets.get("svft_random_d16").kwargs == {"pattern": "random", "d": 16}
    assert presets.get("lora_r8").kwargs == {"rank": 8, "alpha": 16.0}
    assert set(presets.PRESETS) == {"svft_plain", "svft_banded_d2", "svft_random_d2", "svft_topk_d2", "lora_r1",
                                    "lora_r8", "dora_r1", "vera_r256", "full_ft", "head_only",
                                    "svft_banded_eq_lora_r1", "svft_random_eq_vera_r256"}
    assert configs.VISION.learning_rate("svft_banded_d2") == 5e-2
    assert configs.VISION.learning_rate("svft_banded_d8") == 5e-3
    with pytest.raises(ValueError, match="unknown method preset"):
        presets.get("svft_diagonal")
    with pytest.raises(ValueError, match="width"):
        presets.get("svft_banded")
    with pytest.raises(ValueError, match="no _d suffix"):
        presets.get("svft_plain_d2")


def _vit_params(**config):
    """Parameter shapes (no values) of a FlaxViTForImageClassification."""
    from transformers import FlaxViTForImageClassification, ViTConfig

    model = FlaxViTForImageClassification(ViTConfig(**config), _do_init=False)
    size = model.config.image_size
    return jax.eval_shape(lambda key: model.init_weights(key, (1, size, size, 3)), jax.random.PRNGKey(0))


@needs_flax_models
def test_vit_targets_per_method_reproduce_the_papers_counts():
    """ViT-B/16 shapes: LoRA r=8 on all six projections is 1.32M and SVFT^B d=2 0.27M (paper,
    Table 5), while SVFT^P and VeRA adapt query+value only. Counts from the formulas
    r·(d1+d2) and the banded |Ω| over the kernels each preset's targets select."""
    params = _vit_params(num_labels=100, num_hidden_layers=1)  # ViTConfig's defaults are ViT-B/16; its 12 layers are alike
    flat = {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}

    def kernels(name):
        paths = svft_jax.select_targets(params, configs.VISION.targets_for(presets.get(name)))
        return [flat[p].shape for p in paths]

    lora = 12 * sum(8 * (a + b) for a, b in kernels("lora_r8"))
    banded = 12 * sum(svft_jax.banded_count(min(shape), 2) for shape in kernels("svft_banded_d2"))
    assert len(kernels("lora_r8")) == len(kernels("svft_banded_d2")) == 6
    assert len(kernels("svft_plain")) == len(kernels("vera_r256")) == 2
    assert {p.rsplit("/", 3)[-2] for p in svft_jax.select_targets(params, configs.VISION.targets_for(presets.get("svft_plain")))} == {"query", "value"}
    # The paper truncates: 1,327,104 -> "1.32M", 276,048 -> "0.27M".
    assert lora == 1_327_104 and f"{math.floor(lora / 1e4) / 100:.2f}M" == configs.VISION_PAPER_COUNTS["vit-base"]["lora_r8"]
    assert banded == 276_048 and f"{math.floor(banded / 1e4) / 100:.2f}M" == configs.VISION_PAPER_COUNTS["vit-base"]["svft_banded_d2"]


# --- few-shot sampling ------------------------------------------------------------------------
def test_sample_per_class_exact_counts_disjoint_and_deterministic(rng):
    labels = rng.integers(0, 7, 500)
    train, val = data.sample_per_class(lambda i: labels[i], len(labels), 7, (10, 2), seed=3)
    assert np.bincount(labels[train], minlength=7).tolist() == [10] * 7
    assert np.bincount(labels[val], minlength=7).tolist() == [2] * 7
    assert not set(train) & set(val)
    again = data.sample_per_class(lambda i: labels[i], len(labels), 7, (10, 2), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val), again, strict=True))
    other = data.sample_per_class(lambda i: labels[i], len(labels), 7, (10, 2), seed=4)
    assert not np.array_equal(train, other[0])


def test_sample_per_class_reads_only_what_it_needs_and_rejects_small_classes():
    labels = np.repeat(np.arange(3), 1000)
    reads = []
    data.sample_per_class(lambda i: reads.append(i) or labels[i], len(labels), 3, (10, 2), seed=0)
    assert len(reads) < 300  # stops once every quota is filled
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        data.sample_per_class(lambda i: min(labels[i], 1) if i < 2990 else 2, len(labels), 3, (10, 2), seed=0)


# --- scripts end to end on mock data ------------------------------------------------------------
# One CPU device, no log files (the driver's sharding and logging have their own tests), a
# train-loss row per step (the tests compare the first and the last).
FAST = ("--config.data_parallel=false", "--config.log_format=none", "--config.log_every=1")


def structured_source(make_example, n):
    """A mock_data `as_data_source_fn` whose examples are well formed (random text can't be parsed)."""

    def as_data_source(builder, split=None, decoders=None, **kwargs):
        del decoders, kwargs
        return [make_example(builder.name, builder.builder_config.name if builder.builder_config else None, i) for i in range(n)]

    return as_data_source


def _glue_example(name, config, i):
    """CoLA-like rows whose label is carried by the words ("fine" vs "wrong")."""
    label = i % 2
    return {"sentence": ("all fine here " if label else "wrong wrong no ") * 2, "label": np.int64(label), "idx": np.int32(i)}


@needs_flax_models
def test_glue_end_to_end_beats_the_majority_baseline(tmp_path):
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=structured_source(_glue_example, 24)):
        metrics = glue.main([
            "--task=cola", "--model=tiny", "--method=svft_banded_d1", "--max_length=32",
            "--config.steps=30", "--config.batch_size=8", "--config.head_learning_rate=0.01", "--config.learning_rate=0.05",
            *FAST, f"--output_dir={tmp_path}",
        ])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["score"] == pytest.approx(metrics["score"]) == pytest.approx(metrics["validation"]["mcc"])
    # A majority-class predictor has MCC 0 and accuracy 0.5 on these balanced rows.
    assert metrics["validation"]["mcc"] > 0.8 and metrics["validation"]["accuracy"] > 0.9, metrics["validation"]
    assert metrics["steps"] == 30 and metrics["train_loss"]["last"] < metrics["train_loss"]["first"]
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
    with pytest.raises(FileExistsError):  # never overwrites a previous run's metrics
        glue.main(["--task=cola", "--model=tiny", f"--output_dir={tmp_path}"])


def _image_example(name, config, i):
    num_classes = vision.DATASETS["resisc45"].num_classes
    image = np.full((20, 28, 3), (i * 37) % 256, np.uint8)
    return {"image": image, "label": np.int64(i % num_classes), "filename": f"{i}.jpg"}


@needs_flax_models
def test_image_classification_end_to_end_tiny_vit(tmp_path):
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=structured_source(_image_example, 135)):
        metrics = vision.main([
            "--dataset=resisc45", "--model=tiny", "--method=svft_plain", "--train_per_class=2", "--val_per_class=1",
            "--max_test_examples=16", "--config.steps=2", "--config.batch_size=16", *FAST, f"--output_dir={tmp_path}",
        ])
    assert metrics["train_examples"] == 90 and metrics["validation_examples"] == 45 and metrics["test_examples"] == 16
    # SVFT^P adapts query and value only (the paper's ViT config): 2 kernels of 32×32, |Ω| = 32 each.
    assert metrics["adapter_parameters"] == 2 * 32
    assert metrics["trainable_parameters"] == 2 * 32 + 32 * 45 + 45  # + the new head
    assert metrics["adapter_parameters_vs_paper"] == {"method": "svft_plain", "scope": "query_value", "ours": 64, "paper": None}
    assert round(metrics["test"]["accuracy"] * 16) == pytest.approx(metrics["test"]["accuracy"] * 16)  # 16 images, padding excluded
    assert (tmp_path / "metrics.json").exists()


def _gsm8k_example(name, config, i):
    a, b = i + 2, 3
    return {"question": f"Tom has {a} boxes of {b} pens. How many pens?", "answer": f"{a} * {b} = <<{a}*{b}={a * b}>>{a * b}\n#### {a * b}",
            "annotation": "", "short_answer": str(a * b)}


@pytest.mark.slow  # the LM tasks compile a decoder twice (train + generate); `make test-slow`
def test_math_reasoning_end_to_end_tiny_llama(tmp_path):
    math_file = tmp_path / "math.jsonl"
    math_file.write_text("\n".join(json.dumps({"problem": f"What is {k}+1?", "solution": f"It is $\\boxed{{{k + 1}}}$."}) for k in range(3)))
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=structured_source(_gsm8k_example, 16)):
        metrics = math_reasoning.main([
            "--model=tiny", "--method=svft_plain", f"--math_jsonl={math_file}", "--max_length=256", "--max_prompt_length=48",
            "--max_new_tokens=4", "--eval_batch_size=2", "--max_eval_examples=3",
            "--config.steps=6", "--config.batch_size=8", "--config.accumulation_steps=2", "--config.learning_rate=0.5",
            *FAST, f"--output_dir={tmp_path / 'run'}",
        ])
    # The loss covers the answers (≈ ln 260 for the random byte model at first), and falls.
    assert metrics["steps"] == 6 and 1.0 < metrics["train_loss"]["last"] < metrics["train_loss"]["first"]
    # 3 problems, decoding batches of 2 (the last one padded): the accuracy is a recount of the outputs.
    questions = [_gsm8k_example("gsm8k", None, i) for i in range(3)]
    recount = [math_reasoning.numbers_match(math_reasoning.extract_gsm8k_answer(o), math_reasoning.gsm8k_reference(q["answer"]))
               for o, q in zip(metrics["gsm8k"]["samples"], questions, strict=True)]
    assert metrics["gsm8k"]["examples"] == 3 and metrics["gsm8k"]["accuracy"] == pytest.approx(np.mean(recount))
    recount = [math_reasoning.math_answers_match(math_reasoning.extract_math_answer(o), str(k + 1))
               for k, o in enumerate(metrics["math"]["samples"])]
    assert metrics["math"]["examples"] == 3 and metrics["math"]["accuracy"] == pytest.approx(np.mean(recount))


def _commonsense_example(name, config, i):
    label = i % 2
    if name == "bool_q":
        return {"question": f"is {i} even", "passage": "p", "title": "t", "answer": label == 0}
    if name == "piqa":
        return {"goal": f"open jar {i}", "sol1": "twist", "sol2": "smash", "label": np.int64(label), "id": str(i)}
    if name == "unified_qa":
        return {"input": f"what next {i}? \\n (A) go (B) stay (C) run \\n ctx", "output": ["go", "stay", "run"][i % 3]}
    if name == "hellaswag":
        return {"context": "a man", "activity_label": "walk", "endings": ["a", "b", "c", "d"], "label": np.int32(i % 4),
                "split_type": "", "source_id": ""}
    if name == "winogrande":
        return {"sentence": "_ is tall", "option1": "Ann", "option2": "Bob", "label": np.int64(label)}
    if name == "ai2_arc":
        return {"id": str(i), "question": "sky colour?", "choices": {"text": ["red", "blue", "green"], "label": [0, 1, 2]}, "answerKey": np.int64(i % 3)}
    if name == "openbookqa":
        return {"question": {"stem": "sun is a", "choice_A": "star", "choice_B": "moon", "choice_C": "car", "choice_D": "dog"},
                "answerKey": np.int64(i % 4), "fact1": "", "humanScore": np.float32(1), "clarity": np.float32(1), "turkIdAnonymized": ""}
    raise AssertionError(name)


@pytest.mark.slow
def test_commonsense_end_to_end_all_eight_tasks(tmp_path):
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=structured_source(_commonsense_example, 4)):
        metrics = commonsense.main([
            "--model=tiny", "--method=svft_random_d1", "--max_length=512", "--max_prompt_length=64", "--max_new_tokens=3",
            "--eval_batch_size=4", "--max_eval_per_task=2", "--config.steps=4", "--config.batch_size=8",
            "--config.accumulation_steps=1", "--config.learning_rate=0.5", *FAST, f"--output_dir={tmp_path}",
        ])
    assert set(metrics["tasks"]) == set(commonsense.TASKS)
    assert metrics["train_examples"] == 8 * 4
    assert 1.0 < metrics["train_loss"]["last"] < metrics["train_loss"]["first"]  # answers fit in max_length, and are learnt
    for name, task in metrics["tasks"].items():  # 2 examples per task: the samples are every output; recount them
        answers = [commonsense.TASKS[name].format(_commonsense_example(commonsense.TASKS[name].tfds_name.split("/")[0], None, i))[1]
                   for i in range(2)]
        recount = [commonsense.extract_choice(o, commonsense.TASKS[name].answers) == a for o, a in zip(task["samples"], answers, strict=True)]
        assert task["examples"] == 2 and task["accuracy"] == pytest.approx(np.mean(recount)), name
    assert metrics["average_accuracy"] == pytest.approx(np.mean([t["accuracy"] for t in metrics["tasks"].values()]))
