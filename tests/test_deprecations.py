"""One-release aliases of issue 19 behave as their new names: `optimizer`'s unused second
argument warns and changes nothing; `plan` is `size`'s keyword spelling; old module paths are
the new modules. Truth: the updates and reports of the new spellings themselves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import svft_jax


def _adapted():
    params = {"dense": {"kernel": jnp.asarray(np.random.default_rng(2).normal(size=(6, 4)), jnp.float32)}}
    return params, svft_jax.apply(params, "banded", d=1)


def test_optimizer_second_argument_warns_and_changes_nothing():
    _, adapted = _adapted()
    train, _ = svft_jax.split(adapted)
    grads = jax.tree.map(jnp.ones_like, train)
    with pytest.warns(DeprecationWarning, match="second argument is unused"):
        old = svft_jax.optimizer(optax.adam(1e-2), adapted)
    new = svft_jax.optimizer(optax.adam(1e-2))
    for a, b in zip(jax.tree.leaves(old.update(grads, old.init(train), train)[0]),
                    jax.tree.leaves(new.update(grads, new.init(train), train)[0]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_plan_is_the_keyword_spelling_of_size():
    params, _ = _adapted()
    old = svft_jax.plan(params, "banded", d=1)
    new = svft_jax.size(params, svft_jax.SVFT(pattern=svft_jax.Banded(d=1)))
    assert old.totals == new.totals and [r.method for r in old.rows] == [r.method for r in new.rows]


def test_old_module_paths_are_the_new_modules():
    import svft_jax.core._protocol as new_protocol
    import svft_jax.transform._protocol as old_protocol

    assert old_protocol is new_protocol
    assert svft_jax.adapters.create is svft_jax.banks.create
    assert svft_jax.transform.SVFTNode is svft_jax.SVFTNode
