"""The one dense float64 SVFT reference the tests compare against.

Everything here is written from the paper's formula with numpy, independently of the library's
structured products: M is scattered by hand from (rows, cols, m), and W = W0 + U M Vᵀ (or
U (diag(s) + M) Vᵀ without a stored W0) in float64.
"""

from __future__ import annotations

import numpy as np


def f64(x) -> np.ndarray:
    return np.asarray(np.asarray(x, np.float32) if getattr(x, "dtype", None) is not None and str(x.dtype) == "bfloat16" else x, np.float64)


def dense_m(node, m=None) -> np.ndarray:
    """M (*stack, r, r) in float64 from m (· sigmoid(gate) for init="reference") on Ω."""
    meta = node.meta
    stack, r, n = meta.layout.stack_shape, meta.rank, meta.num_entries
    coeffs = f64(node.m if m is None else m)
    if m is None and node.gate is not None:
        coeffs = coeffs / (1.0 + np.exp(-f64(node.gate)))[..., None]
    rows = np.broadcast_to(meta.rows.array, (*stack, n))
    cols = np.broadcast_to(meta.cols.array, (*stack, n))
    dense = np.zeros((*stack, r, r))
    for layer in np.ndindex(*stack):
        np.add.at(dense[layer], (rows[layer], cols[layer]), coeffs[layer])
    return dense


def weight(node, m=None, to_matrix=None) -> np.ndarray:
    """W (*stack, d1, d2) in float64: W0 + U M Vᵀ, or U (diag(s) + M) Vᵀ without W0.

    `to_matrix`: kernel -> W written by hand for the layout (default: the node's layout).
    """
    u, v = f64(node.u), f64(node.v)
    core = dense_m(node, m)
    if node.base is None:
        s = f64(node.s)
        return u @ (core + s[..., :, None] * np.eye(s.shape[-1])) @ np.swapaxes(v, -1, -2)
    to_matrix = to_matrix or node.meta.layout.to_matrix
    return to_matrix(f64(node.base)) + u @ core @ np.swapaxes(v, -1, -2)


def kernel(node, m=None) -> np.ndarray:
    """The adapted kernel in its own layout, float64."""
    return node.meta.layout.from_matrix(weight(node, m))


def omega_gradient(node, g_kernel) -> np.ndarray:
    """∂⟨G, kernel⟩/∂m = (Uᵀ G_W V) read at Ω, float64 (*stack, |Ω|) (no gate)."""
    u, v = f64(node.u), f64(node.v)
    g_w = node.meta.layout.to_matrix(f64(g_kernel))
    full = np.swapaxes(u, -1, -2) @ g_w @ v
    stack, n = node.meta.layout.stack_shape, node.meta.num_entries
    rows = np.broadcast_to(node.meta.rows.array, (*stack, n))
    cols = np.broadcast_to(node.meta.cols.array, (*stack, n))
    out = np.zeros((*stack, n))
    for layer in np.ndindex(*stack):
        out[layer] = full[layer][rows[layer], cols[layer]]
    return out


def dense_nnx_model(base, kernels: dict):
    """A clone of the NNX model `base` with the given kernels ({'/'-joined path: array}) in
    place: the dense model an adapted one must equal."""
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.clone(base)
    modules = dict(nnx.iter_modules(model))
    for path, kernel in kernels.items():
        parent, name = path.rsplit("/", 1)
        module = modules[tuple(int(p) if p.isdigit() else p for p in parent.split("/"))]
        getattr(module, name).set_value(jnp.asarray(kernel, jnp.float32))
    return model
