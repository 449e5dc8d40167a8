r"""GSM-8K and MATH with SVFT after MetaMathQA-style SFT (paper Table 2).

The paper fine-tunes Gemma-2B/7B and LLaMA-3-8B on MetaMathQA-40K (2 epochs) and scores greedy
answers on the GSM-8K and MATH test sets. Here:
- training data: `--train_json=MetaMathQA-40K.json` (a JSON list of {"query", "response"}, the
  authors' file) when given; otherwise the TFDS `gsm8k` train split rewritten in MetaMathQA's
  answer style (calculator annotations <<...>> removed, "#### N" -> "The answer is: N").
- evaluation: GSM-8K test from TFDS `gsm8k`; MATH test from `--math_jsonl` (JSON lines with
  "problem"/"solution" as in Hendrycks et al., or MetaMath's "instruction"/"output"); TFDS has
  no MATH builder.
- answers: GSM-8K takes the number after "The answer is:" (else the last number in the text)
  and compares numerically; MATH takes the last \boxed{...} (else the text after "The answer
  is:") and compares after light LaTeX normalisation (`normalize_math_answer`).

Full run (Gemma-2B, plain SVFT; data from `tfds build gsm8k --file_format=array_record`):

    python -m experiments.paper.math_reasoning --model=google/gemma-2b --method=svft_plain \
        --train_json=data/MetaMathQA-40K.json --math_jsonl=data/MATH_test.jsonl \
        --output_dir=runs/math/gemma-2b/svft_plain

Smoke run (tests): `--model=tiny --config.steps=2 --config.batch_size=8 --config.accumulation_steps=1
--max_eval_examples=8 --max_new_tokens=8`. Writes `metrics.json` with GSM-8K / MATH accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
from collections.abc import Sequence

from experiments.harness import data
from experiments.paper import common, lm
from experiments.paper.configs import MATH

# --- answer extraction ----------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"The answer is:?\s*(.*)", re.IGNORECASE | re.DOTALL)


def parse_number(text: str) -> float | None:
    """The first number in `text` as a float ('1,234' -> 1234, '3/4' -> 0.75), or None."""
    match = _NUMBER.search(text.replace("$", ""))
    if match is None:
        return None
    token = match.group(0).replace(",", "")
    if "/" in token:
        numerator, denominator = token.split("/")
        return float(numerator) / float(denominator) if float(denominator) != 0 else None
    return float(token)


def extract_gsm8k_answer(text: str) -> float | None:
    """The model's final number: after 'The answer is:' if present, else the last number."""
    match = _ANSWER_IS.search(text)
    if match:
        value = parse_number(match.group(1))
        if value is not None:
            return value
    numbers = _NUMBER.findall(text.replace("$", ""))
    return parse_number(numbers[-1]) if numbers else None


def gsm8k_reference(answer: str) -> float:
    """The gold number of a GSM-8K answer: the text after '####'."""
    if "####" not in answer:
        raise ValueError(f"GSM-8K answer without '####': {answer[-80:]!r}")
    value = parse_number(answer.split("####")[-1])
    if value is None:
        raise ValueError(f"no number after '####' in {answer[-80:]!r}")
    return value


def numbers_match(prediction: float | None, reference: float, tolerance: float = 1e-4) -> bool:
    """Numeric equality with a small absolute tolerance (None never matches)."""
    return prediction is not None and abs(prediction - reference) <= tolerance


def gsm8k_to_metamath(answer: str) -> str:
    """A GSM-8K solution in MetaMathQA's style: no <<calc>> annotations, ends 'The answer is: N'."""
    body, _, final = answer.partition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is: {final.strip()}"


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} (or \fbox{...}) with balanced braces, or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        # '\boxed 5' form: the token after the space
        rest = text[start:].split(None, 1)
        return rest[1].split("$")[0].strip() if len(rest) > 1 else None
    depth = 0
    for position in range(brace, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : position]
    return None


def normalize_math_answer(answer: str) -> str:
    r"""Light LaTeX normalisation so equal answers compare equal as strings.

    Removes spaces, `\left`/`\right`, `\!`, `$`, degree marks, `\text{..}` wrappers (keeps the
    content), a trailing '.', maps `\dfrac`/`\tfrac` to `\frac`, `\frac12` to `\frac{1}{2}`,
    and '.5' to '0.5' (no numeric evaluation, as in the MATH reference scorer).
    """
    s = answer.strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("$", ""), ("^\\circ", ""), ("^{\\circ}", ""),
                     ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), (" ", "")):
        s = s.replace(old, new)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = s.rstrip(".")
    if re.fullmatch(r"\.\d+", s):
        s = "0" + s
    return s


def extract_math_answer(text: str) -> str | None:
    r"""The model's final MATH answer: the last \boxed{} if any, else the text after 'The answer is:'."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    match = _ANSWER_IS.search(text)
    if match:
        return match.group(1).strip().split("\n")[0]
    return None


def math_answers_match(prediction: str | None, reference: str) -> bool:
    """Equality after `normalize_math_answer`."""
    return prediction is not None and normalize_math_answer(prediction) == normalize_math_answer(reference)


# --- data -------------------------------------------------------------------------------------
def read_metamath_json(path: str) -> list[tuple[str, str]]:
    """(query, response) pairs from a MetaMathQA JSON list."""
    with open(path) as handle:
        records = json.load(handle)
    try:
        return [(record["query"], record["response"]) for record in records]
    except (KeyError, TypeError) as err:
        raise ValueError(f"--train_json={path}: expected a JSON list of {{'query', 'response'}} objects.") from err


def read_math_jsonl(path: str) -> list[tuple[str, str]]:
    r"""(problem, reference answer) pairs from a MATH test JSONL; the reference is the solution's last \boxed{}."""
    items = []
    with open(path) as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            problem = record.get("problem", record.get("instruction"))
            solution = record.get("solution", record.get("output"))
            if problem is None or solution is None:
                raise ValueError(f"--math_jsonl={path} line {line_number}: needs 'problem'/'solution' (or 'instruction'/'output').")
            answer = record.get("answer") or last_boxed(solution)
            if answer is None:
                raise ValueError(f"--math_jsonl={path} line {line_number}: no \\boxed{{}} answer in the solution.")
            items.append((problem, answer))
    return items


def gsm8k_train_pairs(source) -> list[tuple[str, str]]:
    """(prompt, response) pairs from TFDS gsm8k examples, MetaMathQA-style."""
    pairs = []
    for i in range(len(source)):
        example = source[i]
        pairs.append((lm.format_prompt(data.as_text(example["question"])), gsm8k_to_metamath(data.as_text(example["answer"]))))
    return pairs


@dataclasses.dataclass(frozen=True)
class Options(lm.LMOptions):
    """Math flags (besides `LMOptions`, `PaperOptions` and the driver's `--config.*`).

    Attributes:
      math_jsonl: MATH test JSONL (problem/solution); MATH is skipped without it.
      max_train_examples, max_eval_examples: use only the first N examples.
    """

    math_jsonl: str | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = None


def main(argv: Sequence[str] | None = None) -> dict:
    """SFT on MetaMathQA (or GSM-8K train), then greedy GSM-8K / MATH accuracy. Returns metrics."""
    args, config, given = common.setup(argv, Options(), MATH, __doc__)
    load = functools.partial(data.load_source, data_dir=args.data_dir, download=args.download)

    if args.train_json:
        pairs = [(lm.format_prompt(q), r) for q, r in read_metamath_json(args.train_json)]
    else:
        pairs = gsm8k_train_pairs(data.limit(load("gsm8k", "train"), args.max_train_examples))
    pairs = pairs[: args.max_train_examples] if args.max_train_examples else pairs
    gsm8k_test = data.limit(load("gsm8k", "test"), args.max_eval_examples)
    math_test = read_math_jsonl(args.math_jsonl)[: args.max_eval_examples] if args.math_jsonl else None

    results, config, generate = lm.fine_tune(args, config, given, MATH, pairs, name="metamath")
    metrics = {"model": args.model, "method": args.preset.name, "train_examples": len(pairs)}
    questions = [data.as_text(gsm8k_test[i]["question"]) for i in range(len(gsm8k_test))]
    references = [gsm8k_reference(data.as_text(gsm8k_test[i]["answer"])) for i in range(len(gsm8k_test))]
    outputs = generate([lm.format_prompt(q) for q in questions])
    correct = [numbers_match(extract_gsm8k_answer(o), ref) for o, ref in zip(outputs, references, strict=True)]
    metrics["gsm8k"] = {"accuracy": sum(correct) / len(correct), "examples": len(correct), "samples": outputs[:3]}
    if math_test:
        outputs = generate([lm.format_prompt(problem) for problem, _ in math_test])
        correct = [math_answers_match(extract_math_answer(o), ref) for o, (_, ref) in zip(outputs, math_test, strict=True)]
        metrics["math"] = {"accuracy": sum(correct) / len(correct), "examples": len(correct), "samples": outputs[:3]}
    metrics.update(common.run_summary(results["adapted"], None, results, config))
    common.write_metrics(args.output_dir, metrics, overwrite=args.overwrite)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
