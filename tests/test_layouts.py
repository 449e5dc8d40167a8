"""Kernel layouts: to_matrix/from_matrix are exact inverses, W's entries sit where a
brute-force index computation says, the inference rules pick the documented axes, and an
ambiguous conv kernel is skipped by default and refused (with the fix) when targeted.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import svft_jax
from svft_jax.transform.layout import resolve_layout


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


LAYOUT_CASES = [
    pytest.param((5, 7), None, (0, (0,), (1,)), id="dense-in-out"),
    pytest.param((5, 7), "out_in", (0, (1,), (0,)), id="gpt2-out-in"),
    pytest.param((12, 3, 4), None, (0, (0,), (1, 2)), id="dense-general-in-heads-hd"),
    pytest.param((3, 4, 12), None, (0, (0, 1), (2,)), id="dense-general-heads-hd-out"),
    pytest.param((3, 5, 4), None, (1, (1,), (2,)), id="stacked-in-out"),
    pytest.param((2, 12, 3, 4), None, (1, (1,), (2, 3)), id="stacked-dense-general-in"),
    pytest.param((2, 3, 4, 12), None, (1, (1, 2), (3,)), id="stacked-dense-general-out"),
    pytest.param((3, 5, 4), "stacked_in_out", (1, (1,), (2,)), id="declared-stacked"),
    pytest.param((2, 3, 4, 5), {"stack_ndim": 0, "in_axes": (0, 2), "out_axes": (3, 1)}, (0, (0, 2), (3, 1)), id="interleaved-axes"),
    pytest.param((3, 3, 4, 6), {"stack_ndim": 0, "in_axes": (0, 1, 2), "out_axes": (3,)}, (0, (0, 1, 2), (3,)), id="declared-conv"),
    pytest.param((2, 4, 3), {"stack_ndim": 1, "in_axes": (-1,), "out_axes": (-2,)}, (1, (2,), (1,)), id="negative-axes"),
]


@pytest.mark.parametrize(("shape", "declared", "expected"), LAYOUT_CASES)
def test_layout_reads_the_documented_axes(shape, declared, expected):
    layout = resolve_layout(shape, "float32", declared)
    assert (layout.stack_ndim, layout.in_axes, layout.out_axes) == expected
    assert layout.d1 == int(np.prod([shape[a] for a in expected[2]]))
    assert layout.d2 == int(np.prod([shape[a] for a in expected[1]]))
    assert layout.stack_shape == shape[: expected[0]]


@pytest.mark.parametrize(("shape", "declared", "expected"), LAYOUT_CASES)
def test_to_matrix_places_entries_where_brute_force_indexing_says(shape, declared, expected):
    layout = resolve_layout(shape, "float32", declared)
    kernel = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    np.testing.assert_array_equal(layout.to_matrix(kernel), _brute_force_matrix(kernel, *expected))


@pytest.mark.parametrize(("shape", "declared", "expected"), LAYOUT_CASES)
def test_from_matrix_inverts_to_matrix_on_numpy_and_jax_arrays(shape, declared, expected):
    layout = resolve_layout(shape, "float32", declared)
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


@pytest.mark.parametrize("shape", [(3, 3, 16, 32), (3, 5, 4, 7), (2, 2, 2, 2, 2)])
def test_ambiguous_kernels_have_no_inferred_layout(shape):
    assert resolve_layout(shape, "float32") is None


def test_layouts_are_hashable_and_equal_by_value():
    # jit caches on node metadata, which holds the layout
    first = resolve_layout((2, 12, 3, 4), "float32")
    second = resolve_layout((2, 12, 3, 4), "float32")
    assert first == second and hash(first) == hash(second)
    assert first != resolve_layout((2, 12, 3, 4), "bfloat16")


# --- conv kernels end to end --------------------------------------------------------------------

def _conv_params():
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)},
        "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)},
    }


def test_default_targets_skip_an_ambiguous_conv_kernel():
    params = _conv_params()
    assert svft_jax.select_targets(params) == ["dense/kernel"]
    adapted = svft_jax.apply(params, svd_backend="numpy")
    assert adapted["conv"]["kernel"] is params["conv"]["kernel"]
    assert svft_jax.is_node(adapted["dense"]["kernel"])


def test_targeting_an_ambiguous_conv_kernel_explains_how_to_declare_its_layout():
    with pytest.raises(ValueError) as info:
        svft_jax.apply(_conv_params(), targets="conv/kernel", svd_backend="numpy")
    message = str(info.value)
    assert "'conv/kernel'" in message and "(3, 3, 4, 6)" in message
    assert "overrides=" in message and "in_axes" in message and "out_axes" in message


def test_a_declared_conv_layout_adapts_the_kernel_as_in_by_out():
    params = _conv_params()
    adapted = svft_jax.apply(
        params, "banded", d=1, targets="conv/kernel", svd_backend="numpy",
        overrides={"conv/kernel": {"layout": {"stack_ndim": 0, "in_axes": (0, 1, 2), "out_axes": (3,)}}},
    )
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
    ],
)
def test_bad_declared_layouts_are_value_errors(declared, fragment):
    with pytest.raises(ValueError, match=fragment):
        resolve_layout((3, 3, 4, 6), "float32", declared)
