"""Shared checks of the execution-strategy tests: loss and gradients of a wrapped model against
the merged model, under jit and grad.

Truth is always `fn(svft_jax.merge(adapted))`; `assert_same` compares the loss and every
gradient leaf (scaled by that leaf's largest magnitude, so a tolerance means the same on every
leaf). `perturb` makes every trainable value non-zero, so the update and its gradient path are
not trivial.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import svft_jax


def loss_and_grads(fn, adapted):
    """jit(value_and_grad) of sum(out²) w.r.t. the trainable half of `adapted`; fn(adapted) -> out."""
    trainable, frozen = svft_jax.split(adapted)
    loss = lambda t: jnp.sum(jnp.square(fn(svft_jax.combine(t, frozen))))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(trainable)


def assert_same(result, truth, rtol=2e-4):
    """(loss, grads) equal to (loss_ref, grads_ref): loss to `rtol`, each gradient leaf to `rtol` of its max."""
    (loss, grads), (loss_ref, grads_ref) = result, truth
    np.testing.assert_allclose(loss, loss_ref, rtol=rtol)
    leaves, leaves_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    assert len(leaves) == len(leaves_ref) > 0
    for got, want in zip(leaves, leaves_ref, strict=True):
        scale = float(jnp.max(jnp.abs(want))) + 1e-12
        np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=rtol)


def perturb(adapted, amount=0.05):
    """Every trainable array of every node moved off its initial value (amount × 1, 2 or 3 by position)."""
    def bump(node):
        if not svft_jax.is_node(node):
            return node
        changes = {}
        for field in node.trainable_fields():
            value = getattr(node, field)
            if value is not None:
                ramp = 1 + jnp.arange(value.size, dtype=jnp.float32).reshape(value.shape) % 3
                changes[field] = value + amount * ramp.astype(value.dtype)
        return dataclasses.replace(node, **changes)
    return jax.tree.map(bump, adapted, is_leaf=svft_jax.is_node)
