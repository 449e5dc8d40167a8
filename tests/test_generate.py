# ruff: noqa: E402  (the module skips on transformers 5 before importing Flax models)
"""KV-cache decoding (`svft_jax.models.generate`) on a tiny random Llama.

Truths: greedy decoding with the cache equals, token by token, the argmax of a full forward
pass over the whole sequence so far with no cache; a sampled token always lies in the top-k /
top-p set of that same no-cache forward; a ragged batch (left-padded) gives each row exactly
what the prompt alone gives; a stop token ends its row; an SVFT-adapted model decodes like its
merged parameters (and at M = 0 like the base model), merging once per call (counted), never
inside the decoding loop (the loop's program gets no adapter node).
"""

from tests.stack import skip_module_without_flax_models  # noqa: I001 - before the Flax model imports

skip_module_without_flax_models()

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import LlamaConfig

import svft_jax
import svft_jax.models as svft_models
from svft_jax.models import hf

CONFIG = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, rope_theta=1e5, tie_word_embeddings=True,
                     eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def tiny():
    svft_models.honour_rope_theta()
    model = hf.FlaxLlamaForCausalLMTied(CONFIG, _do_init=False)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: (0.7 * rng.standard_normal(s.shape)).astype(np.float32),
                                    model.params_shape_tree)
    forward = jax.jit(lambda p, ids: model(ids, params=p).logits)
    return model, params, forward


WIDTH = 32


def no_cache_logits(forward, params, sequence):
    """(len(sequence), vocab) logits of one sequence by one full forward pass, no cache.

    Row t is the next-token distribution after sequence[:t + 1]. The sequence is right-padded
    to WIDTH so that one compiled program serves every length: under the causal mask, tokens
    after t cannot change row t.
    """
    ids = np.zeros((1, WIDTH), np.int32)
    ids[0, : len(sequence)] = sequence
    return np.asarray(forward(params, jnp.asarray(ids))[0, : len(sequence)])


def test_greedy_cache_equals_full_forward_argmax(tiny):
    model, params, forward = tiny
    prompt = [5, 9, 11]
    out = svft_models.generate(model, params, [prompt], max_new_tokens=8, stop_token_id=())
    sequence = prompt + out.tokens[0].tolist()
    # Step i's token must be the argmax after the prompt and the i tokens before it.
    want = no_cache_logits(forward, params, sequence)[len(prompt) - 1: -1].argmax(-1)
    np.testing.assert_array_equal(out.tokens[0], want)
    assert out.lengths.tolist() == [8] and not out.stopped[0]
    assert len(set(out.tokens[0].tolist())) > 1  # not a degenerate constant stream


def test_ragged_batch_equals_each_prompt_alone(tiny):
    model, params, _ = tiny
    prompts = [[5, 9, 11], [4]]
    batch = svft_models.generate(model, params, prompts, max_new_tokens=8, stop_token_id=())
    for row, prompt in enumerate(prompts):
        alone = svft_models.generate(model, params, [prompt], max_new_tokens=8, stop_token_id=())
        np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0])
    # A (B, T) array with a left-padding mask is the same input.
    ids, mask = svft_models.left_pad(prompts, 0)
    again = svft_models.generate(model, params, ids, attention_mask=mask, max_new_tokens=8, stop_token_id=())
    np.testing.assert_array_equal(again.tokens, batch.tokens)


def test_stop_token_ends_the_row(tiny):
    model, params, _ = tiny
    free = svft_models.generate(model, params, [[5, 9, 11], [12, 13]], max_new_tokens=8, stop_token_id=())
    stop = int(free.tokens[0, 3])  # row 0 emits this token at step 3 (and maybe earlier)
    first = int(np.nonzero(free.tokens[0] == stop)[0][0])
    out = svft_models.generate(model, params, [[5, 9, 11], [12, 13]], max_new_tokens=8, stop_token_id=stop,
                               pad_token_id=47)
    assert out.stopped[0] and out.lengths[0] == first + 1
    np.testing.assert_array_equal(out.tokens[0, : first + 1], free.tokens[0, : first + 1])
    assert np.all(out.tokens[0, first + 1:] == 47)
    row1 = free.tokens[1]
    n1 = int(np.nonzero(row1 == stop)[0][0]) + 1 if (row1 == stop).any() else 8
    np.testing.assert_array_equal(out.tokens[1, :n1], row1[:n1])
    assert out.sequences()[0] == free.tokens[0, : first + 1].tolist()


def test_sampled_tokens_lie_in_top_k_and_top_p(tiny):
    model, params, forward = tiny
    prompt = [5, 9, 11]
    for kwargs in ({"top_k": 3}, {"top_p": 0.6}):
        out = svft_models.generate(model, params, [prompt], max_new_tokens=8, stop_token_id=(), temperature=1.5,
                                   rng=jax.random.key(1), **kwargs)
        for row in out.tokens:
            all_logits = no_cache_logits(forward, params, prompt + row.tolist())[len(prompt) - 1: -1] / 1.5
            for token, logits in zip(row, all_logits, strict=True):
                order = np.argsort(-logits)
                if "top_k" in kwargs:
                    allowed = set(order[:3].tolist())
                else:
                    probs = np.exp(logits[order] - logits.max())
                    probs /= probs.sum()
                    allowed = set(order[: int(np.searchsorted(np.cumsum(probs), 0.6) + 1)].tolist())
                assert int(token) in allowed
    # top_k=1 sampling is greedy; different keys give different samples without it.
    greedy = svft_models.generate(model, params, [prompt], max_new_tokens=8, stop_token_id=())
    k1 = svft_models.generate(model, params, [prompt], max_new_tokens=8, stop_token_id=(), temperature=1.0,
                              top_k=1, rng=jax.random.key(3))
    np.testing.assert_array_equal(k1.tokens, greedy.tokens)
    draws = {tuple(svft_models.generate(model, params, [prompt], max_new_tokens=8, stop_token_id=(), temperature=2.0,
                                        rng=jax.random.key(seed)).tokens[0]) for seed in range(4)}
    assert len(draws) > 1


def test_adapted_model_decodes_like_its_merged_params(tiny):
    model, params, _ = tiny
    adapted = svft_jax.apply(params, "banded", d=1, targets=r".*self_attn/(q|v)_proj/kernel")
    base = svft_models.generate(model, params, [[5, 9, 11]], max_new_tokens=8, stop_token_id=())
    at_zero = svft_models.generate(model, adapted, [[5, 9, 11]], max_new_tokens=8, stop_token_id=())
    np.testing.assert_array_equal(at_zero.tokens, base.tokens)
    trained = jax.tree_util.tree_map(lambda x: x, adapted, is_leaf=svft_jax.is_node)
    train, frozen = svft_jax.split(trained)
    train = jax.tree_util.tree_map(lambda m: m + 3.0, train)
    trained = svft_jax.combine(train, frozen)
    ours = svft_models.generate(model, trained, [[5, 9, 11]], max_new_tokens=8, stop_token_id=())
    merged = svft_models.generate(model, svft_jax.merge(trained), [[5, 9, 11]], max_new_tokens=8, stop_token_id=())
    np.testing.assert_array_equal(ours.tokens, merged.tokens)


def test_adapted_tree_gives_the_merged_tokens_and_is_merged_once_while_it_is_passed_again(tiny, monkeypatch):
    from svft_jax.models import generation

    generation.clear_merge_cache()
    model, params, _ = tiny
    params = jax.tree_util.tree_map(jnp.asarray, params)  # jax arrays, as load_pretrained/load_gguf give
    adapted = svft_jax.apply(params, "banded", d=1, targets=r".*(q|v|gate|down)_proj/kernel")
    train, frozen = svft_jax.split(adapted)
    adapted = svft_jax.combine(jax.tree_util.tree_map(lambda m: m + 0.5, train), frozen)
    merges, decoded_with = [], []
    merge, decode = generation._merged, generation._decode

    def counting_merge(tree):
        merges.append(1)
        return merge(tree)

    def spying_decode(model, steps, sample, params, *rest):
        decoded_with.append(any(svft_jax.is_node(leaf) for leaf in jax.tree_util.tree_leaves(params, is_leaf=svft_jax.is_node)))
        return decode(model, steps, sample, params, *rest)

    monkeypatch.setattr(generation, "_merged", counting_merge)
    monkeypatch.setattr(generation, "_decode", spying_decode)
    prompts = [[5, 9, 11], [7, 3]]
    want = svft_models.generate(model, svft_jax.merge(adapted), prompts, max_new_tokens=12, stop_token_id=())
    assert merges == []  # merged params pass through: nothing to merge
    for _ in range(2):
        got = svft_models.generate(model, adapted, prompts, max_new_tokens=12, stop_token_id=())
        np.testing.assert_array_equal(got.tokens, want.tokens)
    assert len(merges) == 1  # the same adapted tree again: its merge is reused
    assert decoded_with == [False, False, False]  # the decoding program never sees an adapter node
    assert len(set(want.tokens[0].tolist())) > 1
    # A new M (new arrays) is merged anew and decodes like its own merged params.
    moved = svft_jax.combine(jax.tree_util.tree_map(lambda m: m - 1.0, train), frozen)
    got = svft_models.generate(model, moved, prompts, max_new_tokens=12, stop_token_id=())
    assert len(merges) == 2
    np.testing.assert_array_equal(got.tokens, svft_models.generate(model, svft_jax.merge(moved), prompts,
                                                                   max_new_tokens=12, stop_token_id=()).tokens)
    assert not np.array_equal(got.tokens, want.tokens)
    # numpy arrays can change in place, so a tree holding them is merged on every call.
    host = jax.tree_util.tree_map(np.asarray, moved)
    svft_models.generate(model, host, prompts, max_new_tokens=12, stop_token_id=())
    svft_models.generate(model, host, prompts, max_new_tokens=12, stop_token_id=())
    assert len(merges) == 4
    generation.clear_merge_cache()
    svft_models.generate(model, moved, prompts, max_new_tokens=12, stop_token_id=())
    assert len(merges) == 5


def test_bad_arguments_raise(tiny):
    model, params, _ = tiny
    with pytest.raises(ValueError, match="max_new_tokens"):
        svft_models.generate(model, params, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="needs rng"):
        svft_models.generate(model, params, [[1]], max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="apply to sampling"):
        svft_models.generate(model, params, [[1]], max_new_tokens=2, top_k=3)
    with pytest.raises(ValueError, match="left padding"):
        svft_models.generate(model, params, np.array([[1, 2, 0]]), attention_mask=np.array([[1, 1, 0]]),
                             max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        svft_models.generate(model, params, [[1] * 60], max_new_tokens=5)
    with pytest.raises(ValueError, match="empty"):
        svft_models.generate(model, params, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="stop_token_id"):
        svft_models.generate(model, params, [[1]], max_new_tokens=2, stop_token_id=99)
