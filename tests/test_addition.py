# ruff: noqa: E402  (the module skips on transformers 5 before importing Flax models)
"""The LLM experiment's task (experiments.tasks.addition) on the tiny tied Llama: disjoint splits,
the teacher-forced exact-match rule, the gathered tied head, the equal-budget rows, the frontier
plot and the computed reading, and a smoke run of the sweep.

Truths: the equal-budget rows' counts against the reference adapter built for real and counted on
its tree (and the next larger pattern size exceeding it); the plot's error bars against the
seeds' sd; the reading's percentages against the means worked by hand."""

from tests.stack import skip_module_without_flax_models  # noqa: I001 - before the Flax model imports

skip_module_without_flax_models()

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import FlaxLlamaModel

import svft_jax
from experiments.tasks import addition


def test_splits_are_disjoint_fixed_and_sized_by_digit_count():
    test, validation = addition.held_out("test", 200), addition.held_out("validation", 64)
    assert len(test) == 600 and len(validation) == 192
    for problems, split, per in ((test, "test", 200), (validation, "validation", 64)):
        for digits in (2, 3, 4):
            rows = [(a, b) for a, b, d in problems if d == digits]
            assert len(rows) == len(set(rows)) == per
            assert all(len(str(a)) == len(str(b)) == digits for a, b in rows)
        assert all(addition.split_of(a, b) == split for a, b, _ in problems)
    assert not {(a, b) for a, b, _ in test} & {(a, b) for a, b, _ in validation}
    stream = addition.train_stream(0, 4000)
    assert not set(stream) & {(a, b) for a, b, _ in test + validation}
    assert {len(str(a)) for a, _ in stream} == {1, 2, 3, 4}
    assert addition.held_out("test", 200) == test and addition.train_stream(0, 50) == stream[:50]
    assert addition.train_stream(1, 50) != stream[:50]


def test_exact_match_is_greedy_decodings_rule():
    tok = addition.tiny_model()[2]
    rows = [addition.encode(tok, a, b, stop_id=tok.eos_id, length=16) for a, b in ((347, 589), (7, 8), (4021, 3377))]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    newline = tok.encode("\n")[0]
    vocab = tok.vocab_size
    gold = jax.nn.one_hot(batch["targets"], vocab) * 10.0  # the argmax is every answer token and eos
    stop_ids = (tok.eos_id, newline)
    np.testing.assert_array_equal(addition.exact_match(gold, batch, stop_ids), [1, 1, 1])
    # one wrong digit, in the first row only
    wrong = gold.at[0, 1].set(jax.nn.one_hot(tok.encode("5")[0], vocab) * 10.0)
    np.testing.assert_array_equal(addition.exact_match(wrong, batch, stop_ids), [0, 1, 1])
    # a newline instead of eos after the answer also stops; a digit does not (the answer goes on)
    stop = np.asarray(batch["stop_slot"]).argmax(-1)
    as_newline = gold.at[1, stop[1]].set(jax.nn.one_hot(newline, vocab) * 10.0)
    np.testing.assert_array_equal(addition.exact_match(as_newline, batch, stop_ids), [1, 1, 1])
    goes_on = gold.at[2, stop[2]].set(jax.nn.one_hot(tok.encode("0")[0], vocab) * 10.0)
    np.testing.assert_array_equal(addition.exact_match(goes_on, batch, stop_ids), [1, 1, 0])
    # slots past the stop token are ignored, whatever they predict
    noise = gold.at[1, stop[1] + 1 :].set(jax.random.normal(jax.random.key(0), (6 - stop[1] - 1, vocab)))
    np.testing.assert_array_equal(addition.exact_match(noise, batch, stop_ids), [1, 1, 1])
    assert [int(stop[i]) for i in range(3)] == [3, 2, 4]  # 936, 15, 7398 then eos


def test_answer_logits_equal_the_stock_models_logits_at_the_answer_positions():
    model, params, tok = addition.tiny_model(layers=1)
    adapted = svft_jax.apply(params, pattern="banded", d=1, seed=3)
    trainable, frozen = svft_jax.split(adapted)
    trainable = jax.tree_util.tree_map(lambda m: m + 0.05, trainable)  # M ≠ 0: the adapted model differs
    adapted = svft_jax.combine(trainable, frozen)
    rows = [addition.encode(tok, a, b, stop_id=tok.eos_id, length=16) for a, b in ((347, 589), (7, 8))]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    decoder = svft_jax.wrap(FlaxLlamaModel(model.config, _do_init=False), "auto", params_argname="params", strict=True)
    got = addition.answer_logits(decoder, adapted, batch)
    full = model(batch["input_ids"], attention_mask=batch["attention_mask"], params=svft_jax.merge(adapted)).logits
    want = np.take_along_axis(np.asarray(full), np.asarray(batch["positions"])[..., None], axis=1)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.slow  # ~40 s of CPU: five tiny training runs and their evaluations
def test_smoke_run_chooses_the_rate_on_validation_and_writes_its_tables(tmp_path):
    addition.main(["--model=tiny", "--methods=frozen_3shot,svft_plain", "--seeds=0,1", "--lr_factors=1,10",
                   "--extend_at_edge=0",
                   "--steps=3", "--test_per_digits=4", "--validation_per_digits=4", "--eval_batch_size=12",
                   "--check_generation=6", f"--output_dir={tmp_path}", "--compilation_cache="])
    payload = json.loads((tmp_path / "addition.json").read_text())
    runs = [r for r in payload["runs"] if r["method"] == "svft_plain"]
    assert sorted((r["seed"], r["learning_rate"]) for r in runs) == [(0, 0.01), (0, 0.1), (1, min(runs, key=lambda r: (
        r["seed"], r["validation_nll"]))["learning_rate"])]
    chosen = min((r for r in runs if r["seed"] == 0), key=lambda r: r["validation_nll"])["learning_rate"]
    assert all(r["chosen"] == (r["learning_rate"] == chosen) for r in runs)
    assert all(r["final_train_loss"] < r["first_train_loss"] for r in runs)
    frozen = next(r for r in payload["runs"] if r["method"] == "frozen_3shot")
    assert frozen["generation_check"]["agree"] == frozen["generation_check"]["problems"] == 6
    md = (tmp_path / "addition.md").read_text()
    assert f"**{chosen:g}:" in md and "| svft_plain |" in md and "frozen_3shot" in md
    assert (tmp_path / "addition.png").stat().st_size > 0
    with pytest.raises(ValueError, match="budget"):
        addition.main(["--model=tiny", "--methods=svft_plain", "--seeds=0", "--steps=4", f"--output_dir={tmp_path}",
                       "--resume", "--compilation_cache="])


def test_resume_accepts_results_written_under_the_old_module_path(tmp_path):
    """Results files record `python -m experiments.addition ...` (before experiments/tasks/); only
    the budget decides whether `--resume` may continue them, and their command is kept."""
    options = addition.Options(output_dir=str(tmp_path))
    budget = addition.config_lib.json_ready(addition.budget(options, addition.TRAIN))
    runs = [dict(method="svft_plain", seed=0, learning_rate=0.01)]
    old = "python -m experiments.addition --seeds=0"
    (tmp_path / "addition.json").write_text(json.dumps(dict(command=old, config=budget, runs=runs)))
    _, finished, command = addition.report.resume(tmp_path / "addition.json", budget, ["svft_plain"], [0])
    assert finished == runs and command == old + addition.report.RESUMED


def test_nll_gain_is_the_share_of_full_fts_drop_from_the_frozen_model():
    table = [dict(method=addition.FROZEN, test_nll_mean=4.0), dict(method="full_ft", test_nll_mean=2.0),
             dict(method="svft_banded_d2", test_nll_mean=2.5), dict(method="lora_r8", test_nll_mean=1.5)]
    gains = addition.nll_gain_of_full_ft(table)
    # (4 − 2.5) / (4 − 2) = 75 %; beating full FT's NLL is over 100 %; the references are 0 and 100
    assert gains == {addition.FROZEN: 0.0, "full_ft": 100.0, "svft_banded_d2": 75.0, "lora_r8": 125.0}
    assert set(addition.nll_gain_of_full_ft(table[1:]).values()) == {None}


def _bare_setting(params):
    """A Setting with only what `adapt` reads (the parameters and an empty factor store)."""
    return addition.Setting(model=None, params=params, tokenizer=None, stop_ids=(), loss_fn=None, scores=None, sets={})


@pytest.mark.parametrize("name, reference, size", [("svft_banded_eq_lora_r1", "lora_r1", "d"),
                                                   ("svft_random_eq_vera_r256", "vera_r256", "k_at_max_rank")])
def test_equal_budget_rows_train_no_more_than_the_reference_adapter_on_the_same_targets(name, reference, size):
    params = addition.tiny_model()[1]
    preset, ref = addition.presets_lib.get(name), addition.presets_lib.get(reference)
    setting = _bare_setting(params)
    adapted, recorded = addition.adapt(setting, preset, seed=0)
    built = ref.adapt(params, targets=ref.targets("llama"), seed=0)  # the reference for real, counted on its tree
    ref_count = svft_jax.count_parameters(built)["trainable"]
    count = svft_jax.count_parameters(adapted)
    assert recorded["reference_trainable"] == ref_count and recorded["budget_of"] == reference
    assert 0 < count["trainable"] <= ref_count
    assert count["trainable"] == recorded["budget_choice"]["trainable"]
    assert count["targets"] == svft_jax.count_parameters(built)["targets"]  # the same kernels
    # the solver's size is the largest that fits: one more exceeds the reference's count (banded:
    # |Ω| of d + 1 per target; random: k = ⌊K·r/r_max⌋ per target with K + 1, the documented rule)
    ranks = [row.rank for row in svft_jax.plan(params, targets=preset.targets("llama"), pattern="plain").rows]
    if size == "d":
        over = svft_jax.plan(params, targets=preset.targets("llama"), pattern="banded", d=recorded["budget_choice"]["d"] + 1)
        assert over.totals["trainable"] > ref_count
    else:
        k = recorded["budget_choice"]["k_at_max_rank"]
        assert count["trainable"] == sum(min(max(k * r // max(ranks), 1), r * r) for r in ranks)
        assert sum(min(max((k + 1) * r // max(ranks), 1), r * r) for r in ranks) > ref_count


def _rows(method, trainable, scores, lr=0.01):
    """Per-seed result rows as run_one writes them (the fields summary/markdown read)."""
    return [dict(method=method, seed=seed, learning_rate=lr, trainable=trainable, total=1_000_000, chosen=True,
                 validation_accuracy=score, validation_nll=1.0 - score, test_accuracy=score, test_nll=1.0 - score,
                 test_exact_2digit=score, test_exact_3digit=score, test_exact_4digit=score, step_time_s=0.1)
            for seed, score in enumerate(scores)]


def test_frontier_plot_has_sd_error_bars_and_the_frozen_line_and_the_reading_is_computed(tmp_path, monkeypatch):
    import matplotlib.axes

    rows = (_rows(addition.FROZEN, 0, [0.02], lr=0.0) + _rows("full_ft", 1_000_000, [0.30, 0.34, 0.38])
            + _rows("svft_banded_d2", 4_000, [0.30, 0.32, 0.34]) + _rows("svft_plain", 200, [0.10, 0.10, 0.10])
            + _rows("lora_r1", 3_000, [0.20, 0.21, 0.22]) + _rows("lora_r8", 24_000, [0.40, 0.41, 0.42])
            + _rows("vera_r256", 400, [0.05, 0.30, 0.55]))
    bars, lines = {}, []
    errorbar, axhline = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.axhline

    def record_errorbar(self, x, y, yerr=None, **kwargs):
        bars[x] = (y, yerr)
        return errorbar(self, x, y, yerr=yerr, **kwargs)

    def record_axhline(self, y=0, **kwargs):
        lines.append(y)
        return axhline(self, y, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", record_errorbar)
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", record_axhline)
    options = addition.Options(model="tiny", output_dir=str(tmp_path))
    addition.write_tables(rows, options, addition.TRAIN, "python -m experiments.tasks.addition", tmp_path)
    assert (tmp_path / "addition.png").stat().st_size > 0
    # one error bar per trained method at its trainable count: mean ± the seeds' sd, in %
    assert set(bars) == {1_000_000, 4_000, 200, 3_000, 24_000, 400}
    np.testing.assert_allclose(bars[4_000], (32.0, 100 * np.std([0.30, 0.32, 0.34], ddof=1)))
    np.testing.assert_allclose(bars[400], (30.0, 25.0))
    assert lines == [pytest.approx(2.0)]  # the frozen 3-shot
    md = (tmp_path / "addition.md").read_text()
    reading = md[md.index("## The reading"):]
    # 0.32 / 0.34 = 94.1 %; per seed 0.30/0.34 = 88 % to 0.34/0.34 = 100 %
    assert "**94.1 % of full FT's** (per seed 88–100 %)" in reading and "within the seed spread" in reading
    assert "**29.4 % of full FT's**" in reading and "does not hold" in reading
    # SVFT^B (4,000) meets only LoRA r=8 (24,000): loses; SVFT^P (200) meets VeRA (ties: sd 25), LoRA r=1, r=8
    assert "| svft_banded_d2 | 4,000 | 32.00 ± 2.00 | 2 of 2 | loses lora_r8 (24,000; -9.0) |" in reading
    assert "ties vera_r256 (400; -20.0); loses lora_r1 (3,000; -11.0); loses lora_r8" in reading
    assert "Of 4 such comparisons SVFT beats the baseline in 0, ties in 1 and loses in 3" in reading


def test_a_run_below_the_frozen_model_is_named_with_its_methods_other_seeds():
    rows = (_rows(addition.FROZEN, 0, [0.02], lr=0.0) + _rows("full_ft", 1_000_000, [0.30, 0.34, 0.38])
            + _rows("lora_r1", 3_000, [0.20, 0.0, 0.22]))
    rows[-2]["final_train_loss"] = 1.9
    text = addition.runs_that_did_not_learn(rows)
    # lora_r1 seed 1 (0 % < the frozen model's 2 %); its other seeds 0.20, 0.22: 21.00 ± 1.41
    assert text.startswith("Runs that did not learn (test exact match below the frozen 3-shot model's 2.00 %")
    assert "lora_r1 seed 1 at 0.01: 0.00 % (final training loss 1.90; its other 2 seeds: 21.00 ± 1.41 %)" in text
    assert "full_ft" not in text
    assert addition.runs_that_did_not_learn(rows[:4]) == ""  # nobody below the frozen model
    assert addition.runs_that_did_not_learn(rows[1:]) == ""  # no frozen reference
