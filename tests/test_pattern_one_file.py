"""A pattern with an option of its own is one file (tests/example_pattern.py): SVFT adapts with
it, `size` counts it, adapter files record and restore the option. Truth: the dense float64
W0 + U M Vᵀ with M diagonal on every stride-th index, and the recorded option itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from example_pattern import Stripes

import svft_jax
from svft_jax.checkpoint import load_adapter, save_adapter
from svft_jax.patterns._registry import PATTERNS


@pytest.fixture(scope="module", autouse=True)
def _registered_once():
    yield
    PATTERNS.unregister("example_stripes")


def _params():
    return {"dense": {"kernel": jnp.asarray(np.random.default_rng(5).normal(size=(7, 5)), jnp.float32)}}


def test_own_option_reaches_the_pattern_and_the_file(tmp_path):
    params = _params()
    config = svft_jax.SVFT(pattern=Stripes(stride=2))
    assert svft_jax.size(params, config, targets="dense/kernel").rows[0].entries == 3  # r = 5: indices 0, 2, 4
    adapted = svft_jax.adapt(params, config, targets="dense/kernel")
    node = adapted["dense"]["kernel"]
    np.testing.assert_array_equal(node.meta.rows.array, [0, 2, 4])
    node = node.with_trainable({"m": np.array([0.5, -1.0, 2.0], np.float32)})
    adapted = {"dense": {"kernel": node}}
    u, s, v = (np.asarray(x, np.float64) for x in (node.u, node.s, node.v))
    m = np.zeros((5, 5))
    m[[0, 2, 4], [0, 2, 4]] = [0.5, -1.0, 2.0]
    truth = np.asarray(params["dense"]["kernel"], np.float64) + (u @ m @ v.T).T
    np.testing.assert_allclose(svft_jax.merge(adapted)["dense"]["kernel"], truth, rtol=1e-5, atol=1e-5)
    assert node.config()["pattern_options"] == [["stride", 2]]
    loaded = load_adapter(save_adapter(tmp_path / "a.safetensors", adapted), params)
    assert loaded["dense"]["kernel"].meta.plan == node.meta.plan
    np.testing.assert_allclose(svft_jax.merge(loaded)["dense"]["kernel"], truth, rtol=1e-5, atol=1e-5)
    jax.block_until_ready(loaded["dense"]["kernel"].m)


def test_the_pattern_checks_its_own_option_naming_the_path():
    with pytest.raises(ValueError, match="parameter 'dense/kernel': Stripes\\(stride=...\\) must be a positive int"):
        svft_jax.adapt(_params(), svft_jax.SVFT(pattern=Stripes(stride=0)), targets="dense/kernel")
