"""LoRA, DoRA and VeRA nodes against dense numpy formulas from their papers.

Each baseline is checked for: the merged weight against a hand-written numpy reference, the
identity at initialisation, its trainable-parameter count, autodiff gradients against finite
differences, frozen leaves surviving optimisation bit-for-bit, and the shared machinery (split,
combine, summary, factored execution) working unchanged.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import svft_jax
from svft_jax.baselines import DoRANode, LoRANode, VeRANode, dora, lora, vera

D_IN, D_HID, D_OUT = 6, 5, 3


def _params(rng):
    """A small MLP in Flax Dense layout (in, out), plus a norm and a head the defaults skip."""
    return {
        "dense_in": {"kernel": jnp.asarray(rng.normal(size=(D_IN, D_HID)), jnp.float32),
                     "bias": jnp.zeros((D_HID,), jnp.float32)},
        "dense_out": {"kernel": jnp.asarray(rng.normal(size=(D_HID, D_OUT)), jnp.float32)},
        "layer_norm": {"scale": jnp.ones((D_OUT,), jnp.float32)},
        "head": {"kernel": jnp.asarray(rng.normal(size=(D_OUT, 2)), jnp.float32)},
    }


def _randomise(node, rng, fields, scale=1.0):
    """The node with `fields` set to random values (so ΔW ≠ 0 in the formula checks)."""
    return dataclasses.replace(node, **{f: jnp.asarray(scale * rng.normal(size=getattr(node, f).shape), jnp.float32) for f in fields})


def _w(kernel):
    """Dense kernel (in, out) -> W (out, in), the papers' orientation, in float64 numpy."""
    return np.asarray(kernel, np.float64).T


# ----------------------------------------------------------------------------- formulas


def test_lora_merge_equals_w0_plus_scaled_ba(rng):
    params = _params(rng)
    node = lora.apply(params, rank=2, alpha=3.0)["dense_in"]["kernel"]
    node = _randomise(node, rng, ("a", "b"))
    expected = _w(params["dense_in"]["kernel"]) + (3.0 / 2) * np.asarray(node.b, np.float64) @ np.asarray(node.a, np.float64)
    np.testing.assert_allclose(_w(node.merged_kernel()), expected, rtol=1e-5, atol=1e-5)


def test_vera_merge_equals_w0_plus_scaled_random_matrices(rng):
    params = _params(rng)
    node = vera.apply(params, rank=4)["dense_in"]["kernel"]
    node = _randomise(node, rng, ("scale_d", "scale_b"))
    a, b = np.asarray(node.shared_a, np.float64), np.asarray(node.shared_b, np.float64)
    expected = _w(params["dense_in"]["kernel"]) + np.diag(np.asarray(node.scale_b)) @ b @ np.diag(np.asarray(node.scale_d)) @ a
    np.testing.assert_allclose(_w(node.merged_kernel()), expected, rtol=1e-5, atol=1e-5)


def test_dora_merge_normalises_each_output_unit(rng):
    """W = m ⊙ V / ‖V‖ with the norm over the inputs of each output unit (PEFT's dim=1 of (out, in))."""
    params = _params(rng)
    node = dora.apply(params, rank=2, alpha=4.0)["dense_in"]["kernel"]
    node = _randomise(node, rng, ("a", "b", "magnitude"))
    direction = _w(params["dense_in"]["kernel"]) + 2.0 * np.asarray(node.b, np.float64) @ np.asarray(node.a, np.float64)
    expected = np.asarray(node.magnitude, np.float64)[:, None] * direction / np.linalg.norm(direction, axis=1, keepdims=True)
    merged = _w(node.merged_kernel())
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-5)
    # so each output unit's weights have norm m_i, the decomposition's defining property
    np.testing.assert_allclose(np.linalg.norm(merged, axis=1), np.abs(np.asarray(node.magnitude)), rtol=1e-5)


@pytest.mark.parametrize("method", [lora.apply, dora.apply, vera.apply])
def test_merge_at_init_reproduces_the_base_model(method, rng):
    params = _params(rng)
    merged = svft_jax.merge(method(params))
    for x, y in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


def test_lora_and_vera_init_are_exact_zero_updates(rng):
    params = _params(rng)
    for method in (lora.apply, vera.apply):
        merged = svft_jax.merge(method(params))
        np.testing.assert_array_equal(np.asarray(merged["dense_out"]["kernel"]), np.asarray(params["dense_out"]["kernel"]))


# ----------------------------------------------------------------------------- counts and layout


def test_trainable_counts_match_the_papers_formulas(rng):
    params = _params(rng)
    shapes = [(D_HID, D_IN), (D_OUT, D_HID)]  # (d1 = out, d2 = in) of the two default targets
    r = 2
    assert svft_jax.count_parameters(lora.apply(params, rank=r))["trainable"] == sum(r * (d1 + d2) for d1, d2 in shapes)
    assert svft_jax.count_parameters(dora.apply(params, rank=r))["trainable"] == sum(r * (d1 + d2) + d1 for d1, d2 in shapes)
    assert svft_jax.count_parameters(vera.apply(params, rank=r))["trainable"] == sum(r + d1 for d1, _ in shapes)
    # the count is what split actually hands to the optimiser
    trainable, _ = svft_jax.split(dora.apply(params, rank=r))
    assert sum(x.size for x in jax.tree_util.tree_leaves(trainable)) == sum(r * (d1 + d2) + d1 for d1, d2 in shapes)


def test_default_targets_skip_norms_biases_and_heads(rng):
    adapted = lora.apply(_params(rng))
    nodes = [p for p, x in jax.tree_util.tree_flatten_with_path(adapted, is_leaf=svft_jax.is_node)[0] if svft_jax.is_node(x)]
    assert [svft_jax._paths.path_to_str(p) for p in nodes] == ["dense_in/kernel", "dense_out/kernel"]


def test_vera_shares_random_matrices_by_shape_only(rng):
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
              "c": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}}
    adapted = vera.apply(params, rank=2, seed=1)
    np.testing.assert_array_equal(adapted["a"]["kernel"].shared_a, adapted["b"]["kernel"].shared_a)
    np.testing.assert_array_equal(adapted["a"]["kernel"].shared_b, adapted["b"]["kernel"].shared_b)
    assert adapted["c"]["kernel"].shared_a.shape == (2, 3) and adapted["a"]["kernel"].shared_a.shape == (2, 4)
    other = vera.apply(params, rank=2, seed=2)["a"]["kernel"]
    assert not np.allclose(other.shared_a, adapted["a"]["kernel"].shared_a)


def test_stacked_and_out_in_kernels_follow_the_core_layouts(rng):
    """A (layers, in, out) scan kernel gets per-layer factors; a GPT-2 (out, in) kernel its own orientation."""
    stacked = jnp.asarray(rng.normal(size=(3, D_IN, D_OUT)), jnp.float32)
    gpt2 = jnp.asarray(rng.normal(size=(D_OUT, D_IN)), jnp.float32)
    params = {"scan": {"kernel": stacked}, "c_attn": {"kernel": gpt2}}
    adapted = lora.apply(params, rank=2, alpha=2.0, layouts={"c_attn/kernel": "out_in", "scan/kernel": "stacked_in_out"})
    node = _randomise(adapted["scan"]["kernel"], rng, ("a", "b"))
    assert node.a.shape == (3, 2, D_IN) and node.b.shape == (3, D_OUT, 2)
    merged = np.asarray(node.merged_kernel())
    for layer in range(3):
        expected = np.asarray(stacked[layer]).T + np.asarray(node.b[layer]) @ np.asarray(node.a[layer])
        np.testing.assert_allclose(merged[layer].T, expected, rtol=1e-5, atol=1e-5)
    gnode = _randomise(adapted["c_attn"]["kernel"], rng, ("a", "b"))
    assert gnode.a.shape == (2, D_IN)  # d2 = inputs = axis 1 of an (out, in) kernel
    np.testing.assert_allclose(np.asarray(gnode.merged_kernel()), np.asarray(gpt2) + np.asarray(gnode.b) @ np.asarray(gnode.a), rtol=1e-5, atol=1e-5)
    assert svft_jax.count_parameters(adapted)["trainable"] == 3 * 2 * (D_IN + D_OUT) + 2 * (D_IN + D_OUT)


# ----------------------------------------------------------------------------- gradients and training


def _loss_of_trainable(frozen, x):
    def loss(trainable):
        merged = svft_jax.merge(svft_jax.combine(trainable, frozen))
        hidden = jnp.tanh(x @ merged["dense_in"]["kernel"])
        return jnp.sum(jnp.sin(hidden @ merged["dense_out"]["kernel"]))

    return loss


@pytest.mark.parametrize(
    "adapt",
    [lambda p: lora.apply(p, rank=2, alpha=2.0), lambda p: dora.apply(p, rank=2, alpha=2.0, detach_norm=False),
     lambda p: vera.apply(p, rank=3)],
    ids=["lora", "dora", "vera"],
)
def test_gradients_match_finite_differences(adapt, rng):
    adapted = adapt(_params(rng))
    # random trainable values so every factor gets a non-zero gradient (B = 0 / b = 0 at init
    # kills some); small, so the loss stays smooth at the finite-difference step
    adapted = jax.tree_util.tree_map(
        lambda n: _randomise(n, rng, n.trainable_fields(), scale=0.3) if svft_jax.is_node(n) else n, adapted, is_leaf=svft_jax.is_node
    )
    trainable, frozen = svft_jax.split(adapted)
    x = jnp.asarray(rng.normal(size=(4, D_IN)) * 0.5, jnp.float32)
    check_grads(_loss_of_trainable(frozen, x), (trainable,), order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)


def test_dora_detached_norm_keeps_the_forward_value(rng):
    params = _params(rng)
    attached = _randomise(dora.apply(params, rank=2, detach_norm=False)["dense_in"]["kernel"], rng, ("a", "b"))
    detached = dataclasses.replace(attached, meta=dataclasses.replace(attached.meta, detach_norm=True))
    np.testing.assert_array_equal(np.asarray(attached.merged_kernel()), np.asarray(detached.merged_kernel()))


@pytest.mark.parametrize("method", [lora.apply, dora.apply, vera.apply], ids=["lora", "dora", "vera"])
def test_optimizer_updates_only_adapter_fields(method, rng):
    adapted = method(_params(rng))
    x = jnp.asarray(rng.normal(size=(4, D_IN)), jnp.float32)
    trainable, frozen = svft_jax.split(adapted)
    tx = svft_jax.optimizer(optax.adam(1e-2))
    state = tx.init(adapted)
    loss = _loss_of_trainable(frozen, x)

    @jax.jit
    def step(full, state):
        train, _ = svft_jax.split(full)
        grads_train = jax.grad(loss)(train)
        grads = svft_jax.combine(grads_train, jax.tree_util.tree_map(jnp.zeros_like, frozen))
        updates, state = tx.update(grads, state, full)
        return optax.apply_updates(full, updates), state

    new = adapted
    for _ in range(3):
        new, state = step(new, state)
    before_frozen, after_frozen = svft_jax.split(adapted)[1], svft_jax.split(new)[1]
    for a, b in zip(jax.tree_util.tree_leaves(before_frozen), jax.tree_util.tree_leaves(after_frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # every trainable field moves (A and VeRA's d only from step 2, once B / b left zero)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(svft_jax.split(new)[0]), strict=True)]
    assert moved and all(moved)


# ----------------------------------------------------------------------------- shared machinery


@pytest.mark.parametrize("method,node_type", [(lora.apply, LoRANode), (dora.apply, DoRANode), (vera.apply, VeRANode)])
def test_nodes_are_static_metadata_pytrees(method, node_type, rng):
    adapted = method(_params(rng))
    node = adapted["dense_in"]["kernel"]
    assert isinstance(node, node_type)
    hash(jax.tree_util.tree_structure(node))  # aux data is hashable, so jit can cache on it
    merged_jit = jax.jit(svft_jax.merge)(adapted)
    np.testing.assert_allclose(np.asarray(merged_jit["dense_in"]["kernel"]), np.asarray(svft_jax.merge(adapted)["dense_in"]["kernel"]), rtol=1e-6)
    text = svft_jax.summary(adapted, print_fn=None)
    assert "dense_in/kernel" in text and f"{D_HID}×{D_IN}" in text


@pytest.mark.parametrize("method", [lora.apply, dora.apply, vera.apply], ids=["lora", "dora", "vera"])
def test_factored_execution_matches_merge(method, rng):
    """`svft_jax.strategies.wrap(strategy="factored")` never forms W yet gives the merged model's output."""
    from svft_jax.strategies import wrap

    adapted = jax.tree_util.tree_map(
        lambda n: _randomise(n, rng, n.trainable_fields()) if svft_jax.is_node(n) else n, method(_params(rng)), is_leaf=svft_jax.is_node
    )
    x = jnp.asarray(rng.normal(size=(4, D_IN)), jnp.float32)

    def forward(params, x):
        return jnp.tanh(x @ params["dense_in"]["kernel"]) @ params["dense_out"]["kernel"]

    factored = wrap(forward, strategy="factored")
    np.testing.assert_allclose(np.asarray(factored(adapted, x)), np.asarray(forward(svft_jax.merge(adapted), x)), rtol=1e-4, atol=1e-4)


def test_bad_arguments_fail_early_with_the_parameter_named(rng):
    params = _params(rng)
    with pytest.raises(ValueError, match="rank"):
        lora.apply(params, rank=0)
    with pytest.raises(ValueError, match="matched no parameter"):
        vera.apply(params, targets=".*nothing.*")
    with pytest.raises(ValueError, match="already"):
        lora.apply(lora.apply(params))
    zero_row = {"dense": {"kernel": jnp.zeros((4, 3), jnp.float32)}}
    with pytest.raises(ValueError, match="dense/kernel"):
        dora.apply(zero_row)
    with pytest.raises(TypeError, match="seed"):
        dora.apply(params, seed=1.5)
    broken = {**params, "dense_out": {"kernel": params["dense_out"]["kernel"].at[0, 0].set(jnp.nan)}}
    with pytest.raises(ValueError, match="dense_out/kernel.*NaN"):
        vera.apply(broken)
