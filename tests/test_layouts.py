"""Kernel layouts: to_matrix/from_matrix are exact inverses, W's entries sit where a
brute-force index computation says, and the layouts read from flax paths are the linear maps
the modules really compute.

Truth for the path rules is each flax linen module's own forward pass: a float64 numpy
re-implementation (attention split into heads, scanned layers, a 1-D convolution as
sliding windows) built only from the matrices W the layout reads must reproduce the
module's output. A wrong reading (per-tap conv, one matrix mixing layers, heads from the
wrong axes) gives other matrices and fails. Ambiguous kernels must be refused with every
reading listed, and each listed `overrides` value must be valid input that selects it.
"""

import ast
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import svft_jax
import svft_jax.models as svft_models
from svft_jax._paths import path_to_str
from svft_jax.transform.layout import (
    LAYOUT_NAMES,
    declared_layout,
    layout_candidates,
    layout_readings,
    resolve_layout,
)


def _brute_force_matrix(kernel, stack_ndim, in_axes, out_axes):
    """W[*stack, o, i] = kernel[idx] with o, i the row-major flat indices of idx's out/in axes."""
    shape = kernel.shape
    stack_shape = shape[:stack_ndim]
    d1 = int(np.prod([shape[a] for a in out_axes]))
    d2 = int(np.prod([shape[a] for a in in_axes]))
    matrix = np.zeros((*stack_shape, d1, d2), kernel.dtype)
    for idx in np.ndindex(*shape):
        o = np.ravel_multi_index([idx[a] for a in out_axes], [shape[a] for a in out_axes])
        i = np.ravel_multi_index([idx[a] for a in in_axes], [shape[a] for a in in_axes])
        matrix[(*idx[:stack_ndim], o, i)] = kernel[idx]
    return matrix


# (shape, path, declared) -> (stack_ndim, in_axes, out_axes)
LAYOUT_CASES = [
    pytest.param((5, 7), None, None, (0, (0,), (1,)), id="dense-in-out"),
    pytest.param((5, 7), "h/0/attn/c_attn/kernel", "out_in", (0, (1,), (0,)), id="gpt2-out-in-declared"),
    pytest.param((12, 3, 4), "SelfAttention_0/query/kernel", None, (0, (0,), (1, 2)), id="attention-qkv"),
    pytest.param((16, 4, 8), "attn/value/kernel/value", None, (0, (0,), (1, 2)), id="nnx-attention-qkv-wide"),
    pytest.param((3, 4, 12), "MultiHeadDotProductAttention_0/out/kernel", None, (0, (0, 1), (2,)), id="attention-out"),
    pytest.param((2, 16, 4, 8), "ScanBlock_0/MultiHeadDotProductAttention_0/key/kernel", None, (1, (1,), (2, 3)), id="scanned-attention"),
    pytest.param((2, 4, 8, 16), "encoder/attention/out/kernel", None, (1, (1, 2), (3,)), id="vmapped-attention-out"),
    pytest.param((3, 16, 16), "ScanBlock_0/attn/query/kernel", None, (1, (1,), (2,)), id="scanned-dense-query"),
    pytest.param((3, 5, 4), "ScanBlock_0/Dense_0/kernel", None, (1, (1,), (2,)), id="scanned-dense"),
    pytest.param((2, 3, 5, 4), "ScanOuter_0/ScanInner_0/mlp/kernel", None, (2, (2,), (3,)), id="nested-scans"),
    pytest.param((2, 16, 32), "CheckpointScanBlock_0/up/kernel", None, (1, (1,), (2,)), id="remat-scan-out-is-layers-times-in"),
    pytest.param((4, 2, 8), "VmapDense_0/kernel", None, (1, (1,), (2,)), id="vmap-dense"),
    pytest.param((4, 2, 8), "Dense_3/kernel", None, (1, (1,), (2,)), id="dense-auto-name-with-stack"),
    pytest.param((3, 4, 16), "Conv_0/kernel", None, (0, (0, 1), (2,)), id="conv-1d-im2col"),
    pytest.param((3, 3, 4, 6), "stem/conv/kernel", None, (0, (0, 1, 2), (3,)), id="conv-2d-im2col"),
    pytest.param((2, 3, 4, 16), "ScanBlock_0/Conv_0/kernel", None, (1, (1, 2), (3,)), id="scanned-conv-1d"),
    pytest.param((3, 5, 4), None, "stacked_in_out", (1, (1,), (2,)), id="declared-stacked"),
    pytest.param((2, 3, 16, 4, 8), "x/kernel", "attention_qkv", (2, (2,), (3, 4)), id="declared-attention-qkv"),
    pytest.param((3, 3, 4, 6), "x/kernel", "conv", (0, (0, 1, 2), (3,)), id="declared-conv"),
    pytest.param((2, 3, 4, 5), None, {"stack_ndim": 0, "in_axes": (0, 2), "out_axes": (3, 1)}, (0, (0, 2), (3, 1)), id="interleaved-axes"),
    pytest.param((2, 4, 3), None, {"stack_ndim": 1, "in_axes": (-1,), "out_axes": (-2,)}, (1, (2,), (1,)), id="negative-axes"),
]


@pytest.mark.parametrize(("shape", "path", "declared", "expected"), LAYOUT_CASES)
def test_layout_reads_the_documented_axes(shape, path, declared, expected):
    layout = resolve_layout(shape, "float32", declared, path=path)
    assert (layout.stack_ndim, layout.in_axes, layout.out_axes) == expected
    assert layout.d1 == int(np.prod([shape[a] for a in expected[2]]))
    assert layout.d2 == int(np.prod([shape[a] for a in expected[1]]))
    assert layout.stack_shape == shape[: expected[0]]


@pytest.mark.parametrize(("shape", "path", "declared", "expected"), LAYOUT_CASES)
def test_to_matrix_places_entries_where_brute_force_indexing_says(shape, path, declared, expected):
    layout = resolve_layout(shape, "float32", declared, path=path)
    kernel = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    np.testing.assert_array_equal(layout.to_matrix(kernel), _brute_force_matrix(kernel, *expected))


@pytest.mark.parametrize(("shape", "path", "declared", "expected"), LAYOUT_CASES)
def test_from_matrix_inverts_to_matrix_on_numpy_and_jax_arrays(shape, path, declared, expected):
    layout = resolve_layout(shape, "float32", declared, path=path)
    kernel = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    np.testing.assert_array_equal(layout.from_matrix(layout.to_matrix(kernel)), kernel)
    matrix = np.random.default_rng(1).normal(size=layout.matrix_shape).astype(np.float32)
    np.testing.assert_array_equal(layout.to_matrix(layout.from_matrix(matrix)), matrix)
    jax_kernel = jnp.asarray(kernel)
    np.testing.assert_array_equal(np.asarray(layout.from_matrix(layout.to_matrix(jax_kernel))), kernel)


@st.composite
def kernel_layouts(draw):
    """A random shape (2–5 axes) and a random split of its non-stacked axes into in / out."""
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    stack_ndim = draw(st.integers(0, ndim - 2))
    axes = list(draw(st.permutations(range(stack_ndim, ndim))))
    cut = draw(st.integers(1, len(axes) - 1))
    return shape, {"stack_ndim": stack_ndim, "in_axes": tuple(axes[:cut]), "out_axes": tuple(axes[cut:])}


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(kernel_layouts())
def test_to_and_from_matrix_are_inverses_for_any_axis_split(case):
    shape, spec = case
    layout = resolve_layout(shape, "float32", spec)
    kernel = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    matrix = layout.to_matrix(kernel)
    np.testing.assert_array_equal(matrix, _brute_force_matrix(kernel, spec["stack_ndim"], spec["in_axes"], spec["out_axes"]))
    np.testing.assert_array_equal(layout.from_matrix(matrix), kernel)


def test_layouts_are_hashable_and_equal_by_value():
    # jit caches on node metadata, which holds the layout
    path = "ScanBlock_0/attn/query/kernel"
    first = resolve_layout((2, 12, 3, 4), "float32", path=path)
    second = resolve_layout((2, 12, 3, 4), "float32", path=path)
    assert first == second and hash(first) == hash(second)
    assert first != resolve_layout((2, 12, 3, 4), "bfloat16", path=path)


# --- path rules against the modules' own forward passes (flax linen) ----------------------------
HEADS, IN, QKV, BATCH, TOKENS = 4, 16, 32, 2, 5


class Block(nn.Module):
    """Scanned without a name, so flax calls it 'ScanBlock_0'."""

    @nn.compact
    def __call__(self, x, _):
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=QKV)(x)
        # (layers=2, 16, 32): out = layers·in, the shape that used to read as one DenseGeneral
        up = nn.Dense(2 * IN)(x)
        x = x + nn.Dense(IN)(nn.relu(up))
        return x, None


class _Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=QKV)(x)  # in 16 ≠ qkv 32
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)()(x, None)
        x = nn.Conv(IN, (3,), padding="VALID")(x)  # (taps 3, in 16, out 16): NOT 3 per-tap matrices
        stacked = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0, out_axes=0)(8)
        return stacked(jnp.stack([x, 2 * x]))  # (2, B, T', 8)


def _matrices(params):
    """{path: (W float64 (*stack, d1, d2) by brute-force indexing on the resolved axes, bias)}."""
    flat = {path_to_str(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    out = {}
    for path, kernel in flat.items():
        if path.endswith("/kernel"):
            layout = resolve_layout(kernel.shape, "float32", path=path)
            w = _brute_force_matrix(kernel, layout.stack_ndim, layout.in_axes, layout.out_axes)
            bias = flat[path[: -len("kernel")] + "bias"]
            out[path[: -len("/kernel")]] = (w, bias.reshape(*layout.stack_shape, -1))
    return out


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def _attention(x, w, scope, layer=()):
    """Multi-head attention from the layout's matrices: heads are consecutive head_dim blocks of W's rows."""
    def project(name):
        matrix, bias = w[f"{scope}/{name}"]
        return x @ matrix[layer].T + bias[layer]

    q, k, v = (project(n).reshape(*x.shape[:-1], HEADS, QKV // HEADS) for n in ("query", "key", "value"))
    weights = _softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(QKV // HEADS))
    heads = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*x.shape[:-1], QKV)
    matrix, bias = w[f"{scope}/out"]
    return heads @ matrix[layer].T + bias[layer]


def _reference_forward(w, x):
    x = _attention(x, w, "MultiHeadDotProductAttention_0")
    for layer in range(2):
        x = x + _attention(x, w, "ScanBlock_0/MultiHeadDotProductAttention_0", (layer,))
        up, up_bias = w["ScanBlock_0/Dense_0"]
        down, down_bias = w["ScanBlock_0/Dense_1"]
        x = x + np.maximum(x @ up[layer].T + up_bias[layer], 0) @ down[layer].T + down_bias[layer]
    conv, conv_bias = w["Conv_0"]  # W (out, taps·in): each output position sees a window of 3 tokens
    windows = np.stack([x[:, t : t + 3].reshape(BATCH, -1) for t in range(x.shape[1] - 2)], axis=1)
    x = windows @ conv.T + conv_bias
    dense, dense_bias = w["VmapDense_0"]
    return np.stack([(scale * x) @ dense[i].T + dense_bias[i] for i, scale in enumerate((1, 2))])


@pytest.fixture(scope="module")
def linen_model():
    x = np.random.default_rng(0).standard_normal((BATCH, TOKENS, IN)).astype(np.float32)
    params = _Model().init(jax.random.key(0), x)["params"]  # eager: compiling the scan costs more here
    # non-zero biases, so a bias read on the wrong axes cannot hide
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.1 * jax.random.normal(jax.random.key(len(path_to_str(p))), a.shape) if path_to_str(p).endswith("bias") else a, params)
    return params, x


def test_linen_paths_are_read_as_the_matrices_the_modules_compute(linen_model):
    params, x = linen_model
    matrices = _matrices(params)
    assert matrices["MultiHeadDotProductAttention_0/query"][0].shape == (QKV, IN)
    assert matrices["ScanBlock_0/MultiHeadDotProductAttention_0/out"][0].shape == (2, IN, QKV)
    assert matrices["ScanBlock_0/Dense_0"][0].shape == (2, 2 * IN, IN)
    assert matrices["Conv_0"][0].shape == (IN, 3 * IN)
    assert matrices["VmapDense_0"][0].shape == (2, 8, IN)
    expected = _reference_forward(matrices, np.asarray(x, np.float64))
    np.testing.assert_allclose(np.asarray(_Model().apply({"params": params}, x)), expected, rtol=1e-4, atol=1e-4)


def test_default_apply_on_a_linen_model_needs_no_declared_layout_and_merges_back_exactly(linen_model):
    params, x = linen_model
    adapted = svft_jax.apply(params, "banded", d=1, svd_backend="numpy", targets=r".*/kernel")
    nodes = [leaf for leaf in jax.tree_util.tree_leaves(adapted, is_leaf=svft_jax.is_node) if svft_jax.is_node(leaf)]
    assert len(nodes) == 12  # 4 + 4 attention kernels, 2 scanned Dense, the conv, the vmapped Dense
    for node in nodes:
        stack = node.meta.layout.stack_shape
        assert node.u.shape[: len(stack)] == stack
    merged = jax.jit(svft_jax.merge)(adapted)
    np.testing.assert_array_equal(np.asarray(_Model().apply({"params": merged}, x)), np.asarray(_Model().apply({"params": params}, x)))


# --- refusals: every plausible reading listed, each with a working override ---------------------
AMBIGUOUS = [
    pytest.param((2, 16, 32), "blocks/up/kernel", 3, id="user-named-scan-out-is-layers-times-in"),
    pytest.param((4, 2, 8), "stack/kernel", 3, id="stack-of-4"),
    pytest.param((16, 4, 8), "DenseGeneral_0/kernel", 3, id="dense-general"),
    pytest.param((16, 4), "Einsum_0/kernel", 2, id="einsum-2d"),
    pytest.param((2, 3, 4, 6), "ConvLocal_0/kernel", 6, id="conv-local"),
    pytest.param((2, 16, 4, 8), "layers/proj/kernel", 6, id="4d-unknown"),
    pytest.param((3, 16, 32), None, 3, id="no-path"),
    pytest.param((3, 2, 16, 32), "ScanBlock_0/blocks/up/kernel", 3, id="marked-scan-then-unknown"),
]


def _listed_overrides(message):
    return [ast.literal_eval(m) for m in re.findall(r"overrides=(\{.*\})", message)]


@pytest.mark.parametrize(("shape", "path", "count"), AMBIGUOUS)
def test_an_ambiguous_kernel_is_refused_with_every_reading_and_its_override(shape, path, count):
    with pytest.raises(ValueError) as info:
        resolve_layout(shape, "float32", path=path)
    message = str(info.value)
    assert str(shape) in message and (path is None or repr(path) in message)
    listed = _listed_overrides(message)
    assert len(listed) == count == len(layout_readings(shape, path))
    layouts = set()
    for override in listed:
        (regex, options), = override.items()
        if path is not None:
            assert re.fullmatch(regex, path)
        layouts.add(resolve_layout(shape, "float32", options["layout"], path=path))
    assert layouts == {resolve_layout(shape, "float32", spec) for spec in layout_readings(shape, path)}


def test_a_refused_kernel_is_adapted_per_layer_with_the_listed_override():
    kernel = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 32)), jnp.float32)
    params = {"blocks": {"up": {"kernel": kernel}}}
    with pytest.raises(ValueError, match=r"(?s)parameter 'blocks/up/kernel'.*a stack of 2") as info:
        svft_jax.apply(params, svd_backend="numpy")
    stacked = next(o for o in _listed_overrides(str(info.value)) if next(iter(o.values()))["layout"] == "stacked_in_out")
    node = svft_jax.apply(params, svd_backend="numpy", overrides=stacked)["blocks"]["up"]["kernel"]
    assert node.u.shape == (2, 32, 16)  # one SVD per layer, U spanning that layer's 32 outputs
    u, s, v = (np.asarray(a, np.float64) for a in (node.u, node.s, node.v))
    np.testing.assert_allclose((u * s[:, None, :]) @ np.swapaxes(v, 1, 2), np.swapaxes(np.asarray(kernel, np.float64), 1, 2), atol=1e-5)


# --- target selection ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "shape", "expected"),
    [
        ("Dense_0/kernel", (4, 5), True),
        ("stack/kernel", (4, 2, 8), True),  # ambiguous: a candidate, so apply refuses it loudly
        ("attn/query/kernel/value", (16, 4, 8), True),
        ("Conv_0/kernel", (3, 4, 8), False),
        ("stem/conv/kernel", (3, 3, 4, 8), False),
        ("ConvLocal_0/kernel", (4, 12, 8), False),
        ("Dense_0/bias", (5,), False),
        ("h/0/attn/gpt2_conv1d/kernel", (8, 4), True),  # a 2-D "conv" is a Dense-like matrix
    ],
)
def test_layout_candidates_leave_out_convolutions_and_vectors_only(path, shape, expected):
    assert layout_candidates(path, shape) is expected


def test_declared_layout_is_the_first_matching_overrides_entry():
    query = "layers/MultiHeadDotProductAttention_0/query/kernel"
    declared = svft_models.attention_layouts(stack_ndim=1)
    assert declared_layout(query, declared) == {"stack_ndim": 1, "in_axes": (1,), "out_axes": (2, 3)}
    assert declared_layout(query + "/value", declared) is not None  # NNX State paths too
    assert declared_layout("layers/up/kernel", declared) is None
    # first match wins for every option, as in apply: an earlier entry without a layout hides later ones
    assert declared_layout(query, {r".*query.*": {"pattern": "banded"}, **declared}) is None
    assert declared_layout(query, [(re.compile(r".*"), {"layout": "in_out"})]) == "in_out"
    with pytest.raises(ValueError, match="not a valid regular expression"):
        declared_layout(query, {"(": {"layout": "in_out"}})


class _UserNamedScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="layers")(x, None)
        return x


def test_a_declared_scanned_attention_kernel_is_a_default_target_and_read_per_layer():
    x = np.ones((BATCH, TOKENS, IN), np.float32)
    params = jax.jit(_UserNamedScan().init)(jax.random.key(0), x)["params"]
    query = "layers/MultiHeadDotProductAttention_0/query/kernel"  # (2, 16, 4, 8), qkv 32 ≠ in 16
    targets = svft_jax.select_targets(params)
    assert query in targets and "layers/Dense_0/kernel" in targets
    overrides = {**svft_models.attention_layouts(stack_ndim=1), **svft_models.stacked_layouts()}
    assert declared_layout(query, overrides) is not None
    adapted = svft_jax.apply(params, svd_backend="numpy", overrides=overrides)
    node = adapted["layers"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    kernel = np.asarray(params["layers"]["MultiHeadDotProductAttention_0"]["query"]["kernel"], np.float64)
    u, s, v = (np.asarray(a, np.float64) for a in (node.u, node.s, node.v))
    np.testing.assert_allclose((u * s[:, None, :]) @ np.swapaxes(v, 1, 2), np.swapaxes(kernel.reshape(2, IN, QKV), 1, 2), atol=1e-5)


# --- conv kernels end to end --------------------------------------------------------------------

def _conv_params():
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)},
        "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)},
    }


def test_default_targets_skip_a_conv_kernel():
    params = _conv_params()
    assert svft_jax.select_targets(params) == ["dense/kernel"]
    adapted = svft_jax.apply(params, svd_backend="numpy")
    assert adapted["conv"]["kernel"] is params["conv"]["kernel"]
    assert svft_jax.is_node(adapted["dense"]["kernel"])


@pytest.mark.parametrize("declared", [None, "conv", {"stack_ndim": 0, "in_axes": (0, 1, 2), "out_axes": (3,)}])
def test_a_targeted_conv_kernel_is_adapted_as_out_by_taps_times_in(declared):
    params = _conv_params()
    overrides = None if declared is None else {"conv/kernel": {"layout": declared}}
    adapted = svft_jax.apply(params, "banded", d=1, targets="conv/kernel", svd_backend="numpy", overrides=overrides)
    node = adapted["conv"]["kernel"]
    assert (node.meta.layout.d1, node.meta.layout.d2) == (6, 36)
    m = np.random.default_rng(2).normal(size=node.m.shape).astype(np.float32)
    node = dataclasses.replace(node, m=jnp.asarray(m))
    dense = np.zeros((6, 6))
    np.add.at(dense, (node.meta.rows.array, node.meta.cols.array), m)
    w0 = np.asarray(params["conv"]["kernel"], np.float64).reshape(36, 6).T  # (out, kh·kw·in)
    w = w0 + np.asarray(node.u, np.float64) @ dense @ np.asarray(node.v, np.float64).T
    merged = jax.jit(svft_jax.merge)({"c": node})["c"]
    np.testing.assert_allclose(np.asarray(merged, np.float64), w.T.reshape(3, 3, 4, 6), rtol=1e-5, atol=1e-5)


def test_a_targeted_conv_local_kernel_is_refused_with_the_fix():
    params = {"ConvLocal_0": {"kernel": jnp.ones((4, 12, 8))}}
    with pytest.raises(ValueError, match=r"(?s)'ConvLocal_0/kernel'.*one matrix per output position.*overrides="):
        svft_jax.apply(params, targets=".*kernel", svd_backend="numpy")


@pytest.mark.parametrize(
    ("declared", "fragment"),
    [
        ({"stack_ndim": 0, "in_axes": (0, 1), "out_axes": (2,)}, "exactly once"),  # axis 3 unused
        ({"stack_ndim": 0, "in_axes": (0, 1, 2, 3), "out_axes": ()}, "non-empty"),
        ({"stack_ndim": 3, "in_axes": (3,), "out_axes": (3,)}, "stack_ndim"),
        ({"stack_ndim": 0, "in_axes": (0, 1, 9), "out_axes": (3,)}, "out of range"),
        ({"in_axes": (0, 1, 2)}, "'out_axes'"),
        ({"stack_ndim": 0, "in_axes": ("a",), "out_axes": (3,)}, "tuple of ints"),
        ({"stack_ndim": 0, "in_axes": (0, 1, 2), "out_axes": (3,), "heads": 2}, "unknown layout keys"),
        ("heads_first", "unknown layout 'heads_first'"),
        ("in_out", "exactly once"),  # a 2-D name on a 4-D kernel
        (("in_axes", (0,)), "must be one of"),
    ],
)
def test_bad_declared_layouts_are_value_errors(declared, fragment):
    with pytest.raises(ValueError, match=fragment):
        resolve_layout((3, 3, 4, 6), "float32", declared)


def test_rank_free_layout_names_refuse_kernels_with_too_few_axes():
    assert set(LAYOUT_NAMES) >= {"in_out", "out_in", "stacked_in_out", "attention_qkv", "attention_out", "conv"}
    with pytest.raises(ValueError, match="'attention_qkv' needs a kernel with at least 3 axes"):
        resolve_layout((4, 6), "float32", "attention_qkv")


def test_a_kernel_needs_two_axes():
    with pytest.raises(ValueError, match="at least 2 axes"):
        resolve_layout((5,), "float32", path="Dense_0/kernel")
