"""Commonsense reasoning with SVFT (paper Table 4): BoolQ, PIQA, SIQA, HellaSwag, WinoGrande,
ARC-easy, ARC-challenge, OpenBookQA, in the LLM-Adapters setup.

Each example becomes an LLM-Adapters instruction ("Please choose the correct answer ...
Answer format: answer1/answer2/...") inside the Alpaca prompt; the target response is
"the correct answer is <word>". Evaluation decodes greedily and takes the first allowed answer
word in the output (`extract_choice`), as LLM-Adapters' `extract_answer` does.

Training data: `--train_json` (LLM-Adapters' commonsense_15k.json / commonsense_170k.json, a
JSON list of {"instruction", "output"}) when given; otherwise the union of the eight TFDS train
splits formatted the same way (what commonsense_170k is built from). TFDS names: bool_q, piqa,
unified_qa/social_iqa (SIQA exists in TFDS only inside UnifiedQA; its "question \\n (A) ..
(B) .. (C) .. \\n context" input is parsed back into options), hellaswag, winogrande
(train_xl), ai2_arc/ARC-Easy, ai2_arc/ARC-Challenge, openbookqa.

Full run (Gemma-2B, plain SVFT):

    python -m experiments.paper.commonsense --model=google/gemma-2b --method=svft_plain \
        --train_json=data/commonsense_15k.json --output_dir=runs/commonsense/gemma-2b/svft_plain

Smoke run (tests): `--model=tiny --config.steps=2 --config.batch_size=8 --config.accumulation_steps=1
--max_eval_per_task=4 --max_new_tokens=6`. Writes `metrics.json` (per-task and average accuracy).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
from collections.abc import Callable, Sequence

from experiments.harness import data
from experiments.paper import common, lm
from experiments.paper.configs import COMMONSENSE

RESPONSE_TEMPLATE = "the correct answer is {answer}"


@dataclasses.dataclass(frozen=True)
class CommonsenseTask:
    """One benchmark: TFDS source, splits, the formatter and the allowed answer words."""

    tfds_name: str
    train_split: str
    eval_split: str
    format: Callable[[dict], tuple[str, str]]  # example -> (instruction, answer word)
    answers: tuple[str, ...]


def _options(prefix: str, options: Sequence[str]) -> str:
    return "\n\n".join(f"{prefix}{i + 1}: {option}" for i, option in enumerate(options))


def _answer_format(prefix: str, count: int) -> str:
    return "Answer format: " + "/".join(f"{prefix.lower()}{i + 1}" for i in range(count))


def _multiple_choice(question_line: str, prefix: str, options: Sequence[str], label: int) -> tuple[str, str]:
    if not 0 <= label < len(options):
        raise ValueError(f"label {label} outside the {len(options)} options of {question_line[:60]!r}")
    instruction = f"{question_line}\n\n{_options(prefix, options)}\n\n{_answer_format(prefix, len(options))}"
    return instruction, f"{prefix.lower()}{label + 1}"


def format_boolq(example: dict) -> tuple[str, str]:
    # LLM-Adapters' BoolQ instruction carries the question only (no passage).
    question = data.as_text(example["question"])
    instruction = f"Please answer the following question with true or false, question: {question}?\n\nAnswer format: true/false"
    return instruction, "true" if bool(example["answer"]) else "false"


def format_piqa(example: dict) -> tuple[str, str]:
    goal = data.as_text(example["goal"])
    options = [data.as_text(example["sol1"]), data.as_text(example["sol2"])]
    return _multiple_choice(f"Please choose the correct solution to the question: {goal}", "Solution", options, int(example["label"]))


_SIQA_INPUT = re.compile(r"^(?P<question>.*?)\s*(?:\\n|\n)\s*\(A\)\s*(?P<a>.*?)\s*\(B\)\s*(?P<b>.*?)\s*\(C\)\s*(?P<c>.*?)\s*(?:(?:\\n|\n)\s*(?P<context>.*))?$", re.DOTALL)


def parse_unifiedqa_siqa(text: str, output: str) -> tuple[str, list[str], int]:
    """UnifiedQA's SIQA input 'question \\n (A) x (B) y (C) z \\n context' -> (question with context, options, label)."""
    match = _SIQA_INPUT.match(text.strip())
    if match is None:
        raise ValueError(f"unified_qa/social_iqa input not in 'question \\n (A) .. (B) .. (C) .. \\n context' form: {text[:80]!r}")
    options = [match.group("a"), match.group("b"), match.group("c")]
    normalized = [option.strip().lower() for option in options]
    if output.strip().lower() not in normalized:
        raise ValueError(f"unified_qa/social_iqa output {output!r} is none of the options {options}")
    context = (match.group("context") or "").strip()
    question = f"{context} {match.group('question').strip()}".strip()
    return question, options, normalized.index(output.strip().lower())


def format_siqa(example: dict) -> tuple[str, str]:
    question, options, label = parse_unifiedqa_siqa(data.as_text(example["input"]), data.as_text(example["output"]))
    return _multiple_choice(f"Please choose the correct answer to the question: {question}", "Answer", options, label)


def format_hellaswag(example: dict) -> tuple[str, str]:
    context = f"{data.as_text(example['activity_label'])}: {data.as_text(example['context'])}"
    endings = [data.as_text(e) for e in example["endings"]]
    return _multiple_choice(f"Please choose the correct ending to complete the given sentence: {context}", "Ending", endings, int(example["label"]))


def format_winogrande(example: dict) -> tuple[str, str]:
    sentence = data.as_text(example["sentence"])
    options = [data.as_text(example["option1"]), data.as_text(example["option2"])]
    return _multiple_choice(
        f"Please choose the correct answer to fill in the blank to complete the given sentence: {sentence}", "Option", options, int(example["label"])
    )


def format_arc(example: dict) -> tuple[str, str]:
    question = data.as_text(example["question"])
    choices = example["choices"]
    options = [data.as_text(t) for t in choices["text"]]
    labels = [int(x) for x in choices["label"]]
    answer = int(example["answerKey"])
    if answer not in labels:
        raise ValueError(f"ai2_arc answerKey {answer} is none of the choice labels {labels}")
    return _multiple_choice(f"Please choose the correct answer to the question: {question}", "Answer", options, labels.index(answer))


def format_obqa(example: dict) -> tuple[str, str]:
    question = example["question"]
    options = [data.as_text(question[f"choice_{letter}"]) for letter in "ABCD"]
    return _multiple_choice(f"Please choose the correct answer to the question: {data.as_text(question['stem'])}", "Answer", options, int(example["answerKey"]))


def _words(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i + 1}" for i in range(count))


TASKS = {
    "boolq": CommonsenseTask("bool_q", "train", "validation", format_boolq, ("true", "false")),
    "piqa": CommonsenseTask("piqa", "train", "validation", format_piqa, _words("solution", 2)),
    "siqa": CommonsenseTask("unified_qa/social_iqa", "train", "validation", format_siqa, _words("answer", 3)),
    "hellaswag": CommonsenseTask("hellaswag", "train", "validation", format_hellaswag, _words("ending", 4)),
    "winogrande": CommonsenseTask("winogrande", "train_xl", "validation", format_winogrande, _words("option", 2)),
    "arc_e": CommonsenseTask("ai2_arc/ARC-Easy", "train", "test", format_arc, _words("answer", 5)),
    "arc_c": CommonsenseTask("ai2_arc/ARC-Challenge", "train", "test", format_arc, _words("answer", 5)),
    "obqa": CommonsenseTask("openbookqa", "train", "test", format_obqa, _words("answer", 4)),
}


def extract_choice(text: str, answers: Sequence[str]) -> str | None:
    """The first allowed answer word in `text` (case-insensitive, whole word), or None.

    Longer words are tried first at each position so 'answer1' never matches inside 'answer10'.
    """
    alternatives = "|".join(re.escape(a) for a in sorted(answers, key=len, reverse=True))
    match = re.search(rf"(?<![a-z0-9])({alternatives})(?![a-z0-9])", text.lower())
    return match.group(1) if match else None


def read_adapters_json(path: str) -> list[tuple[str, str]]:
    """(prompt, response) pairs from an LLM-Adapters JSON list of {"instruction", "output"}."""
    with open(path) as handle:
        records = json.load(handle)
    try:
        return [(lm.format_prompt(r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")), r["output"]) for r in records]
    except (KeyError, TypeError) as err:
        raise ValueError(f"--train_json={path}: expected a JSON list of {{'instruction', 'output'}} objects.") from err


def formatted(source, task: CommonsenseTask) -> list[tuple[str, str]]:
    """(prompt, answer word) for every example of `source`."""
    items = []
    for i in range(len(source)):
        instruction, answer = task.format(source[i])
        items.append((lm.format_prompt(instruction), answer))
    return items


@dataclasses.dataclass(frozen=True)
class Options(lm.LMOptions):
    """Commonsense flags (besides `LMOptions`, `PaperOptions` and the driver's `--config.*`).

    Attributes:
      tasks: subset of TASKS.
      max_train_per_task, max_eval_per_task: use only the first N examples of each task.
    """

    tasks: tuple[str, ...] = ()
    max_prompt_length: int = 448
    max_new_tokens: int = 32
    max_train_per_task: int | None = None
    max_eval_per_task: int | None = None

    def __post_init__(self):
        super().__post_init__()
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"--tasks: unknown {unknown}; choose from {list(TASKS)}.")


def main(argv: Sequence[str] | None = None) -> dict:
    """SFT on commonsense_15k (or the TFDS train splits), then greedy accuracy per task. Returns metrics."""
    args, config, given = common.setup(argv, Options(), COMMONSENSE, __doc__)
    names = list(args.tasks or TASKS)
    load = functools.partial(data.load_source, data_dir=args.data_dir, download=args.download)

    if args.train_json:
        pairs = read_adapters_json(args.train_json)
    else:
        pairs = []
        for name in names:
            task = TASKS[name]
            items = formatted(data.limit(load(task.tfds_name, task.train_split), args.max_train_per_task), task)
            pairs += [(prompt, RESPONSE_TEMPLATE.format(answer=answer)) for prompt, answer in items]
    evaluation = {name: formatted(data.limit(load(TASKS[name].tfds_name, TASKS[name].eval_split), args.max_eval_per_task), TASKS[name]) for name in names}

    results, config, generate = lm.fine_tune(args, config, given, COMMONSENSE, pairs, name="commonsense")
    metrics = {"model": args.model, "method": args.preset.name, "train_examples": len(pairs), "tasks": {}}
    for name, items in evaluation.items():
        outputs = generate([prompt for prompt, _ in items])
        correct = [extract_choice(o, TASKS[name].answers) == answer for o, (_, answer) in zip(outputs, items, strict=True)]
        metrics["tasks"][name] = {"accuracy": sum(correct) / len(correct), "examples": len(correct), "samples": outputs[:2]}
    metrics["average_accuracy"] = sum(t["accuracy"] for t in metrics["tasks"].values()) / len(metrics["tasks"])
    metrics.update(common.run_summary(results["adapted"], None, results, config))
    common.write_metrics(args.output_dir, metrics, overwrite=args.overwrite)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
