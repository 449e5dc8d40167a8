"""The experiment harness (experiments/): the driver's refusal of non-finite eval metrics, the
one config reader, the one padding rule and the method presets.

Truths: a NaN injected into the eval at step 4 (eval every 2) stops the run and the step-2
checkpoint restores to exactly the M of an independent 2-step run (constant LR, so the
trajectory does not depend on the planned length); masked means equal numpy's mean over the
real rows; epoch 0 of the data path is grain's own `shuffle(seed)`; presets hand their
options to the library's `apply` unchanged (same nodes as calling it directly); the harness's
losses run the adapted tree through `wrap(auto, strict)` and equal, value and gradient, the same
loss on `svft_jax.merge(adapted)` (the merged model is the definition of the adapted one)."""

import dataclasses
import json
import math
import pathlib
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svft_jax
from experiments.harness import config, data, presets, report, train
from svft_jax.training import losses
from tests.stack import needs_flax_models


def _mlp_task(aggregate_fn=None, seed=0):
    """A 2-layer tanh MLP (8 → 12 → 3) with banded SVFT on its kernels; 3 fixed batches."""
    rng = np.random.default_rng(seed)
    params = {"layer1": {"kernel": rng.normal(size=(8, 12)).astype(np.float32) / 3},
              "layer2": {"kernel": rng.normal(size=(12, 3)).astype(np.float32) / 3}}
    adapted = svft_jax.apply(params, "banded", d=1, svd_backend="numpy")
    batches = [{"x": rng.normal(size=(8, 8)).astype(np.float32), "y": rng.integers(0, 3, 8)} for _ in range(3)]

    def loss_fn(adapted, batch, rng):
        del rng
        merged = svft_jax.merge(adapted)
        logits = jnp.tanh(batch["x"] @ merged["layer1"]["kernel"]) @ merged["layer2"]["kernel"]
        return losses.classification_loss(logits, batch["y"])

    return train.Task(adapted=adapted, loss_fn=loss_fn, train_data=lambda epoch: batches,
                      eval_data=lambda: batches[:1], aggregate_fn=aggregate_fn, name="mlp")


def test_nan_eval_metric_stops_the_run_and_the_last_finite_checkpoint_survives(tmp_path):
    from svft_jax.checkpoint import TrainCheckpointer

    calls = []

    def aggregate_with_nan_at_step_4(per_batch):
        calls.append(len(calls))
        accuracy = float(np.mean([np.asarray(m["accuracy"]) for m in per_batch]))
        return {"accuracy": math.nan if len(calls) == 2 else accuracy}  # evals at steps 2, 4, 6

    config = train.TrainConfig(steps=6, batch_size=8, learning_rate=1e-2, schedule="constant", warmup_fraction=0.0,
                               eval_every=2, log_every=1, progress=False, data_parallel=False,
                               selection_metric="accuracy", selection_mode="max")
    with TrainCheckpointer(tmp_path / "ckpt", max_to_keep=1, best_metric="accuracy", best_mode="max") as manager:
        with pytest.raises(FloatingPointError, match=r"step 4.*not saved.*last checkpoint \(step 2\) is intact"):
            train.run(_mlp_task(aggregate_with_nan_at_step_4), config, checkpoint_manager=manager)
        assert manager.all_steps() == [2]
    reference = train.run(_mlp_task(), dataclasses.replace(config, steps=2, eval_every=0))
    with TrainCheckpointer(tmp_path / "ckpt", max_to_keep=1, best_metric="accuracy", best_mode="max") as manager:
        template, _ = svft_jax.split(_mlp_task().adapted)
        tx, _ = train.make_optimizer(config)
        restored = manager.restore_latest(template, tx.init(template))
    assert restored.step == 2
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.trainable, reference["trainable"])


def test_config_reader_types_flags_and_refusals():
    @dataclasses.dataclass(frozen=True)
    class Options:
        methods: tuple[str, ...] = ("a",)
        seeds: tuple[int, ...] = (0,)
        limit: int | None = None
        resume: bool = False

    options, train_config = config.parse(
        ["--methods=x,y", "--seeds", "1,2", "--limit=none", "--resume", "--config.steps=7", "--batch_size=4",
         "--head_learning_rate=none"], Options(limit=3), train.TrainConfig())
    assert options == Options(methods=("x", "y"), seeds=(1, 2), limit=None, resume=True)
    assert (train_config.steps, train_config.batch_size, train_config.head_learning_rate) == (7, 4, None)
    assert config.flags_given(["--config.steps=7", "--seeds", "1"]) == {"steps", "seeds", }
    with pytest.raises(ValueError, match="unknown config field 'seedz'.*--seeds"):
        config.parse(["--seedz=1"], Options())
    with pytest.raises(ValueError, match="--limit expects int"):
        config.parse(["--limit=ten"], Options())
    with pytest.raises(ValueError, match="finite"):
        config.parse(["--config.learning_rate=nan"], train.TrainConfig())
    with pytest.raises(ValueError, match="positive int"):  # the dataclass's own validation runs on the result
        config.parse(["--config.steps=0"], train.TrainConfig())
    assert config.from_dict(Options, config.to_dict(Options(seeds=(3, 4)))) == Options(seeds=(3, 4))
    with pytest.raises(ValueError, match="no fields"):
        config.from_dict(Options, {"seed": 1})


def test_padding_rule_and_masked_mean_match_numpy(rng):
    rows = [{"x": np.float32(v)} for v in rng.normal(size=7)]
    batches = list(data.eval_batches(rows, lambda r: r, batch_size=3))
    assert [b[data.VALID].tolist() for b in batches] == [[True] * 3, [True] * 3, [True, False, False]]
    assert batches[-1]["x"].tolist() == [rows[6]["x"]] * 3  # the last real row, repeated
    metrics = train.mean_metrics([{"x": b["x"], data.VALID: b[data.VALID]} for b in batches])
    assert metrics == {"x": pytest.approx(float(np.mean([r["x"] for r in rows])))}
    padded, valid = data.pad_rows(["a", "b"], 4)
    assert padded == ["a", "b", "b", "b"] and valid.tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="1 to batch_size"):
        data.pad_rows([], 4)


def test_epoch_zero_is_graines_own_shuffle_and_epochs_differ():
    source = [{"i": np.int32(i)} for i in range(20)]
    first = [int(b["i"][0]) for b in data.train_batches(source, lambda r: r, batch_size=1, seed=3, epoch=0)]
    assert first == [int(r["i"]) for r in grain.MapDataset.source(source).shuffle(seed=3)]
    second = [int(b["i"][0]) for b in data.train_batches(source, lambda r: r, batch_size=1, seed=3, epoch=1)]
    assert sorted(second) == list(range(20)) and second != first


def test_presets_pass_their_options_to_apply_unchanged(rng):
    params = {"dense": {"kernel": rng.normal(size=(6, 5)).astype(np.float32)}}
    via_preset = presets.get("svft_banded_d2").adapt(params, seed=0, svd_backend="numpy")
    direct = svft_jax.apply(params, pattern="banded", d=2, seed=0, svd_backend="numpy")
    assert svft_jax.count_parameters(via_preset) == svft_jax.count_parameters(direct)
    np.testing.assert_array_equal(svft_jax.merge(via_preset)["dense"]["kernel"], svft_jax.merge(direct)["dense"]["kernel"])
    lora = presets.get("lora_r8").adapt(params, seed=0)
    assert svft_jax.count_parameters(lora)["trainable"] == 8 * (6 + 5)
    assert presets.get("full_ft").adapt(params) is params and presets.get("head_only").adapt(params) is params
    assert presets.get("full_ft").full_finetune and not presets.get("lora_r1").full_finetune
    assert [presets.get(n).scope for n in ("svft_plain", "vera_r256", "lora_r8", "dora_r1", "svft_banded_d2")] == [
        "query_value", "query_value", "all", "all", "all"]


def test_full_finetune_trains_weights_and_head_at_their_own_rates(rng):
    """Full fine-tuning: the head moves at head_learning_rate, the other weights at learning_rate
    (Adam's first step moves every element with a gradient by its LR: m/√v = ±1)."""
    start = {"body": {"kernel": rng.normal(size=(4, 4)).astype(np.float32)},
             "classifier": {"kernel": rng.normal(size=(4, 2)).astype(np.float32)}}
    params = jax.tree_util.tree_map(np.copy, start)

    def loss_fn(tree, batch, rng):
        del rng
        logits = (batch["x"] @ tree["body"]["kernel"]) @ tree["classifier"]["kernel"]
        return losses.classification_loss(logits, batch["y"])

    batch = {"x": np.eye(4, dtype=np.float32), "y": np.array([0, 1, 0, 1])}
    task = train.Task(adapted=params, loss_fn=loss_fn, train_data=lambda epoch: [batch], extra="classifier/.*",
                      full_finetune=True)
    config = train.TrainConfig(steps=1, batch_size=4, learning_rate=1e-3, head_learning_rate=1e-1, schedule="constant",
                               warmup_fraction=0.0, progress=False, data_parallel=False)
    result = train.run(task, config)["trainable"]
    body_step = np.abs(np.asarray(result["body"]["kernel"]) - start["body"]["kernel"]).max()
    head_step = np.abs(np.asarray(result["classifier"]["kernel"]) - start["classifier"]["kernel"]).max()
    assert body_step == pytest.approx(1e-3, rel=1e-2) and head_step == pytest.approx(1e-1, rel=1e-2)


def test_learning_rate_sweep_chooses_on_validation_and_reruns_only_the_chosen_rate():
    from experiments.harness import report

    calls = []

    def run_one(preset, seed, lr):
        calls.append((preset.name, seed, lr))
        # validation peaks at 1e-2 for SVFT and 1e-3 for LoRA; test would have picked others
        best = {"svft_plain": 1e-2, "lora_r1": 1e-3}[preset.name]
        return dict(validation_accuracy=1.0 - abs(math.log10(lr / best)), test_accuracy=lr, seed_echo=seed)

    methods = presets.get_many(["svft_plain", "lora_r1"])
    lrs = lambda preset: report.learning_rate_grid(preset, (0.1, 1.0, 10.0))  # noqa: E731
    seen = []
    rows, chosen = report.sweep_then_seeds(run_one, methods, (0, 1, 2), lrs, on_result=lambda r: seen.append(len(r)),
                                           log=lambda s: None)
    assert chosen == {"svft_plain": 1e-2, "lora_r1": 1e-3}
    # 3 sweep runs per method with seed 0, then seeds 1 and 2 at the chosen rate only, seed-major
    assert calls[:6] == [("svft_plain", 0, 1e-3), ("svft_plain", 0, 1e-2), ("svft_plain", 0, 0.1),
                         ("lora_r1", 0, 1e-4), ("lora_r1", 0, 1e-3), ("lora_r1", 0, 1e-2)]
    assert calls[6:] == [("svft_plain", 1, 1e-2), ("lora_r1", 1, 1e-3), ("svft_plain", 2, 1e-2), ("lora_r1", 2, 1e-3)]
    final = report.final_rows(rows)
    assert sorted((r["method"], r["seed"]) for r in final) == sorted((m, s) for m in chosen for s in (0, 1, 2))
    assert all(r["learning_rate"] == chosen[r["method"]] for r in final)
    assert seen[-1] == 10
    table = report.sweep_table(rows)
    assert "**0.01: 100.00**" in table and "**0.001: 100.00**" in table and "0.1: 0.00" in table
    # resuming from the first 7 rows runs only the 3 missing ones and chooses the same rates
    calls.clear()
    rows2, chosen2 = report.sweep_then_seeds(run_one, methods, (0, 1, 2), lrs, finished_rows=rows[:7], log=lambda s: None)
    assert chosen2 == chosen and len(calls) == 3 and len(rows2) == 10
    with pytest.raises(ValueError, match="mode"):
        report.sweep_then_seeds(run_one, methods, (0,), lrs, mode="best")
    with pytest.raises(ValueError, match="no 'validation_nll' score"):  # never a silently skipped method
        report.sweep_then_seeds(run_one, methods, (0,), lrs, select="validation_nll", log=lambda s: None)


def test_learning_rate_in_state_gives_adamws_updates_and_one_program_for_every_rate(rng):
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)} for _ in range(6)]

    def updates(tx):
        state, out = tx.init(params), []
        for g in grads:
            u, state = tx.update(g, state, params)
            out.append(np.asarray(u["w"]))
        return np.stack(out)

    def optimizer(lr, in_state):
        cfg = train.TrainConfig(steps=6, learning_rate=lr, weight_decay=0.01, warmup_fraction=0.5)
        return train.make_optimizer(cfg, full_finetune=True, learning_rate_in_state=in_state)[0]

    np.testing.assert_allclose(updates(optimizer(3e-3, True)), updates(optimizer(3e-3, False)), rtol=1e-5, atol=1e-9)

    def program(tx):
        state = tx.init(params)
        return jax.jit(lambda g, s: tx.update(g, s, params)).lower(grads[0], state).as_text()

    assert program(optimizer(1e-3, True)) == program(optimizer(1e-2, True))
    assert program(optimizer(1e-3, False)) != program(optimizer(1e-2, False))  # the rate is a constant there


def test_resume_marks_the_command_once_and_refuses_another_budget(tmp_path):
    results = tmp_path / "run.json"
    runs = [dict(method="lora_r1", seed=0), dict(method="lora_r1", seed=5), dict(method="full_ft", seed=0)]
    results.write_text(json.dumps(dict(config={"steps": 4}, command="python -m x", runs=runs)))
    _, finished, command = report.resume(results, {"steps": 4}, ["lora_r1"], [0, 1])
    assert finished == [runs[0]] and command == "python -m x" + report.RESUMED
    results.write_text(json.dumps(dict(config={"steps": 4}, command=command, runs=runs)))
    assert report.resume(results, {"steps": 4}, ["lora_r1"], [0])[2] == command  # resumed again: marked once
    with pytest.raises(ValueError, match="another budget"):
        report.resume(results, {"steps": 8}, ["lora_r1"], [0])


def test_status_line_counts_runs_against_the_grid():
    assert report.status_line(3, 3) == "Complete: 3 runs."
    assert report.status_line(3, 3, 1.25, " (1 reused)") == "Complete: 3 runs (1 reused) in 1.2 min."
    assert report.status_line(2, 3, 0.5) == "PARTIAL: 2 runs of 3 after 0.5 min (the run is still going or was stopped)."


def test_sweep_grows_one_step_past_the_edge_its_best_rate_sits_on():
    calls = []
    # validation NLL is lowest at 1e-1 for SVFT (above the grid 1e-2 × (1/3, 1, 3)), at 1e-3 for
    # LoRA (inside its grid) and far below the grid for VeRA (still at the edge after one step)
    optimum = {"svft_plain": 1e-1, "lora_r1": 1e-3, "vera_r256": 1e-6}

    def run_one(preset, seed, lr):
        calls.append((preset.name, seed, lr))
        return dict(validation_nll=abs(math.log(lr / optimum[preset.name])))

    methods = presets.get_many(["svft_plain", "lora_r1", "vera_r256"])
    lrs = lambda preset: report.learning_rate_grid(preset)  # noqa: E731
    quiet = lambda s: None  # noqa: E731
    rows, chosen = report.sweep_then_seeds(run_one, methods, (0, 1), lrs, select="validation_nll", mode="min",
                                           extend_at_edge=1, log=quiet)
    # ×9 of the preset for SVFT (3 · 0.03 / 0.01 = 0.09), nothing for LoRA, ×1/9 once for VeRA
    assert [c for c in calls if c[0] == "svft_plain" and c[1] == 0] == [
        ("svft_plain", 0, 0.00333), ("svft_plain", 0, 0.01), ("svft_plain", 0, 0.03), ("svft_plain", 0, 0.09)]
    assert [c[2] for c in calls if c[0] == "lora_r1" and c[1] == 0] == [0.000333, 0.001, 0.003]
    assert [c[2] for c in calls if c[0] == "vera_r256" and c[1] == 0] == [0.00333, 0.01, 0.03, 0.00111]
    assert chosen == {"svft_plain": 0.09, "lora_r1": 0.001, "vera_r256": 0.00111}
    assert calls[-3:] == [("svft_plain", 1, 0.09), ("lora_r1", 1, 0.001), ("vera_r256", 1, 0.00111)]
    assert len(rows) == 4 + 3 + 4 + 3
    # off by default: the grid as given (the sentiment experiment's behaviour)
    calls.clear()
    _, plain = report.sweep_then_seeds(run_one, methods[:1], (0,), lrs, select="validation_nll", mode="min", log=quiet)
    assert plain == {"svft_plain": 0.03} and len(calls) == 3
    # a resumed run reuses the extension's row and grows the grid the same way
    calls.clear()
    _, again = report.sweep_then_seeds(run_one, methods, (0, 1), lrs, select="validation_nll", mode="min",
                                       extend_at_edge=1, log=quiet, finished_rows=rows[:5])
    assert again == chosen and ("svft_plain", 0, 0.09) not in calls and len(calls) == len(rows) - 5
    assert report.edge_extension([0.1, 0.3, 1.0], 0.3) is None and report.edge_extension([0.5], 0.5) is None
    with pytest.raises(ValueError, match="extend_at_edge"):
        report.sweep_then_seeds(run_one, methods, (0,), lrs, extend_at_edge=-1)


def test_equal_budget_presets_parse_and_refuse_a_size_or_a_non_adapter_reference():
    lora_eq = presets.get("svft_banded_eq_lora_r1")
    assert lora_eq.budget_of == "lora_r1" and lora_eq.scope == "all" and lora_eq.describe()["budget_of"] == "lora_r1"
    assert presets.get("svft_random_eq_vera_r256").scope == "query_value"  # VeRA's scope
    assert presets.get("svft_topk_eq_dora_r4").budget_of == "dora_r4"
    with pytest.raises(ValueError, match="adapter preset"):
        presets.get("svft_banded_eq_full_ft")
    with pytest.raises(ValueError, match="budget_of"):
        presets.Preset(name="x", method="svft", options=(("d", 2), ("pattern", "banded")), learning_rate=1.0,
                       budget_of="lora_r1")


def _perturbed(adapted, extra, seed):
    """`adapted` with every trainable leaf moved off its initial value (SVFT's M and LoRA's B
    start at 0, where a wrong update path would go unnoticed)."""
    trainable, frozen = svft_jax.split(adapted, extra=extra)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(trainable))))
    moved = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), trainable)
    return moved, frozen


@needs_flax_models
@pytest.mark.parametrize("method", ["svft_banded_d2", "svft_plain", "svft_topk_d2", "lora_r8", "dora_r1", "vera_r256"])
def test_sentiment_loss_through_wrap_equals_the_merged_models_loss_and_gradient(method):
    from transformers import BertConfig, FlaxBertModel

    from experiments.harness import models

    # hidden 48 at 32 tokens: `auto` picks spectral (SVFT) and factored (LoRA, DoRA), not the merge
    config = BertConfig(vocab_size=64, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=96, max_position_embeddings=16)
    model, params = models.init_tiny(FlaxBertModel, config, (1, 8))
    module = model.module
    adapted = {"encoder": presets.get(method).adapt(params, seed=0, **({"svd_backend": "numpy"} if method.startswith("svft") else {})),
               "classifier": models.new_head(48, 2, seed=0)}
    trainable, frozen = _perturbed(adapted, "classifier/.*", seed=1)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 64, (4, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": np.array([0, 1, 1, 0], np.int32)}
    forward = models.mean_pooled_logits(module)

    def wrapped_loss(trainable):
        return losses.classification_loss(forward(svft_jax.combine(trainable, frozen), batch), batch["labels"])[0]

    def merged_loss(trainable):  # the definition: the plain model on the merged parameters
        tree = svft_jax.combine(trainable, frozen)
        positions = jnp.broadcast_to(jnp.arange(8), ids.shape)
        hidden = module.apply({"params": svft_jax.merge(tree["encoder"])}, ids, mask, jnp.zeros_like(ids), positions,
                              deterministic=True).last_hidden_state
        weights = mask[..., None].astype(hidden.dtype)
        pooled = jnp.sum(hidden * weights, axis=1) / jnp.sum(weights, axis=1)
        logits = pooled @ tree["classifier"]["kernel"] + tree["classifier"]["bias"]
        return losses.classification_loss(logits, batch["labels"])[0]

    def last_hidden_state(params, ids, mask, positions):
        return module.apply({"params": params}, ids, mask, jnp.zeros_like(ids), positions, deterministic=True).last_hidden_state

    plan = models.run_adapted(last_hidden_state, params_argname=None).plan(adapted["encoder"], ids, mask, ids)
    ran = {name for used in plan.values() for name in used}
    assert ran == ({"rebuild"} if method == "vera_r256" else {"spectral"} if method.startswith("svft") else {"factored"}), plan

    value, grads = jax.jit(jax.value_and_grad(wrapped_loss))(trainable)
    want_value, want_grads = jax.jit(jax.value_and_grad(merged_loss))(trainable)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads), strict=True):
        scale = float(np.max(np.abs(want))) or 1.0
        np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


@needs_flax_models
def test_demo_task_loss_through_wrap_equals_the_merged_models_loss_and_gradient():
    from experiments.harness import models

    config = train.TrainConfig(steps=2, batch_size=4)
    task = train.demo_task(config, num_train=8, num_eval=4, seq_len=8, num_layers=1)
    model, _ = models.tiny_bert_classifier(num_layers=1, seq_len=8, seed=config.seed)
    trainable, frozen = _perturbed(task.adapted, task.extra, seed=1)
    batch = next(iter(task.train_data(0)))

    def merged_loss(trainable):
        merged = svft_jax.merge(svft_jax.combine(trainable, frozen))
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], params=merged).logits
        return losses.classification_loss(logits, batch["labels"])[0]

    def wrapped_loss(trainable):
        return task.loss_fn(svft_jax.combine(trainable, frozen), batch, None)[0]

    value, grads = jax.jit(jax.value_and_grad(wrapped_loss))(trainable)
    want_value, want_grads = jax.jit(jax.value_and_grad(merged_loss))(trainable)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, atol=1e-5 * float(np.max(np.abs(want)) or 1), rtol=1e-4),
                 grads, want_grads)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings (a no-op elsewhere)")
def test_kept_heap_holds_freed_memory_until_release_gives_it_back():
    # A fresh process: its heap holds only this block, so the resident-memory deltas are the block's.
    script = """
import numpy as np
from experiments.harness import train
def rss_mib():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) / 1024
assert train.keep_freed_memory()
block = np.ones(64 * 2**20, np.float32)  # 256 MiB, every page touched
held = rss_mib()
del block
kept = rss_mib()
assert train.release_freed_memory()
print(held, kept, rss_mib())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    held, kept, released = map(float, out.stdout.split())
    assert kept > held - 16  # keep_freed_memory: the freed 256 MiB stay resident (no mmap, no trim)
    assert released < kept - 200  # release_freed_memory: they go back to the OS
