"""The adapter protocol: one base that SVFT, LoRA, DoRA, VeRA (and any new method) implement.

A node stands in for one kernel of the parameter pytree. It is a frozen dataclass registered as
a pytree whose children are its arrays and whose aux data is `meta`, a hashable *plan* that
records the node's whole configuration (path, kernel layout, method options, dtypes, SVD
settings), so `jit` caches on it and files can re-create the node from it.

What a method defines (in its one file, e.g. `svft_jax/transform/svft.py`,
`svft_jax/baselines/lora.py`):

  array fields        declared once with `trainable_field()` or `frozen_field()` (dataclass field metadata)
  delta()             ΔW = W − W0, float32 (*stack, d1, d2)
  matmul(x)           x Wᵀ without forming W (factored execution), x: (..., d2) -> (..., d1)
  update_rank         the width of the factored update (read by the cost model)
  describe()          a short method text for `summary`, e.g. "svft-banded(d=2)"
  build(plans, kernels, factors=None) -> {path: node}   the ONE constructor (apply and files)
  plan_from_config(config) -> plan                      the inverse of `plan.to_config()`

Everything generic — `merge`, `split`/`combine`, `labels`, `trainable_mask`, `optimizer`,
`summary`, `count_parameters`, `wrap`, adapter files — is written once against this class.
A method registers itself with the `adapter_node(method=...)` class decorator.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import math
import zlib
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from svft_jax._registry import Registry
from svft_jax.core.layout import KernelLayout

ROLE = "svft_jax.role"
TRAINABLE, FROZEN = "trainable", "frozen"

#: adapter method name -> node class (filled by `adapter_node`).
METHODS: Registry[type] = Registry("adapter method", "method")

# Probe sketch of ΔW stored in adapter files: Q ΔW P with seeded Gaussian Q: (p, d1), P: (d2, p).
SKETCH_SIZE = 4


def trainable_field():
    """Declare a node field as a trainable array (M, LoRA's A and B, ...)."""
    return dataclasses.field(metadata={ROLE: TRAINABLE})


def frozen_field():
    """Declare a node field as a frozen array (U, s, V, W0, ...)."""
    return dataclasses.field(metadata={ROLE: FROZEN})


def adapter_node(*, method: str):
    """Class decorator: make `cls` a frozen dataclass, a pytree, and the node of `method`.

    Children are the fields declared with `trainable_field()`/`frozen_field()`; every other field is aux
    data (it must be hashable: the plan `meta`).
    """

    def decorate(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        fields = dataclasses.fields(cls)
        data = [f.name for f in fields if ROLE in f.metadata]
        static = [f.name for f in fields if ROLE not in f.metadata]
        jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=static)
        cls.method = method
        METHODS.register(method, cls)
        return cls

    return decorate


def layout_config(layout: KernelLayout) -> dict:
    return {"shape": list(layout.shape), "dtype": layout.dtype, "stack_ndim": layout.stack_ndim,
            "in_axes": list(layout.in_axes), "out_axes": list(layout.out_axes)}


def layout_from_config(config: Mapping) -> KernelLayout:
    return KernelLayout(tuple(int(s) for s in config["shape"]), str(config["dtype"]),
                        int(config["stack_ndim"]), tuple(int(a) for a in config["in_axes"]),
                        tuple(int(a) for a in config["out_axes"]))


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One array a node will hold: shape, dtype name, role ("trainable", "frozen" or "base"),
    and `shared`: a key naming a buffer several nodes share (VeRA's random pair), else None."""

    shape: tuple[int, ...]
    dtype: str
    role: str
    shared: Any = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Plan:
    """Base of every method's plan: what one target's node is built from, decided before any
    array is computed. Subclasses add their options as hashable fields and say what their
    node will hold (`arrays`), so the sizing report (`svft_jax.size`) and the node read one
    description: the node's `describe`, `update_rank` and summary entries delegate here."""

    path: str
    layout: KernelLayout

    def arrays(self) -> dict[str, ArraySpec]:
        """{name: ArraySpec} of every array the node built from this plan holds."""
        raise NotImplementedError(f"{type(self).__name__} does not declare its arrays; define `arrays(self)`.")

    def describe(self) -> str:
        """Short method text for `summary` and `size`, e.g. 'lora(r=8, α=16)'."""
        return type(self).__name__

    @property
    def update_rank(self) -> int:
        """Width of the factored update (read by the cost model); default: the plan's `rank`."""
        return int(self.rank)

    @property
    def has_base(self) -> bool:
        """Whether the node keeps W0 (so factored execution multiplies by it)."""
        return True

    @property
    def entries(self) -> int | None:
        """Trainable values per layer as `summary` shows them (None: trainable / layers)."""
        return None

    def to_config(self) -> dict:
        """A JSON-able dict of every field (the layout as a dict)."""
        config = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            config[field.name] = layout_config(value) if isinstance(value, KernelLayout) else value
        return config

    @classmethod
    def from_config(cls, config: Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        values["layout"] = layout_from_config(config["layout"])
        return cls(**values)

    @property
    def layers(self) -> int:
        return math.prod(self.layout.stack_shape)

    @property
    def key_id(self) -> int:
        """A platform-independent id of the path, folded into seeded draws."""
        return zlib.crc32(self.path.encode()) & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class Record:
    """One node, serialised: its config (JSON-able, whole), its trainable arrays, and a probe
    sketch of ΔW that lets a reload check that it re-created the same update."""

    config: dict
    arrays: dict
    sketch: np.ndarray


class AdapterNode(abc.ABC):
    """Base of every adapter node. See the module docstring for what a method defines."""

    method: ClassVar[str] = ""
    meta: Any

    # ---- fields ---------------------------------------------------------------------------
    @classmethod
    def data_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if ROLE in f.metadata)

    @classmethod
    def trainable_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(ROLE) == TRAINABLE)

    # ---- what a method defines ------------------------------------------------------------
    @abc.abstractmethod
    def delta(self):
        """ΔW = W − W0 in the paper's orientation, float32: (*stack, d1, d2)."""

    @abc.abstractmethod
    def matmul(self, x, *, precision=None, preferred_element_type=None):
        """x Wᵀ for an unstacked node without forming W: x (..., d2) -> (..., d1)."""

    @property
    def plan(self) -> Plan:
        """The node's `Plan` (its `meta`, or the plan its meta wraps)."""
        return getattr(self.meta, "plan", self.meta)

    @property
    def update_rank(self) -> int:
        """Width of the factored update (SVFT: r; LoRA/DoRA/VeRA: their rank); the plan's."""
        return self.plan.update_rank

    def describe(self) -> str:
        """Short method text for `summary`, e.g. 'lora(r=8, α=16)'; the plan's, so `summary`
        and `size` print the same text."""
        return self.plan.describe()

    @classmethod
    @abc.abstractmethod
    def build(cls, plans: list, kernels: Mapping[str, Any], *, factors=None) -> dict:
        """The one constructor: {path: node} for `plans` over the original `kernels`."""

    #: the method's `Plan` subclass (its `meta`, or what its meta is built from).
    plan_cls: ClassVar[type] = Plan
    #: How each array field's trailing axes relate to the kernel, for sharding it like the kernel
    #: (read by `svft_jax.nnx`): "out" (an axis of W's d1), "in" (of d2) or None (the method's
    #: own axis, e.g. a rank); leading axes beyond these are the kernel's stacked layers. A
    #: field not listed is replicated (SVFT's M, a gate).
    axis_roles: ClassVar[Mapping[str, tuple]] = {}
    #: the method's typed config (a `svft_jax.core.Method` subclass; set when it is defined).
    config_cls: ClassVar[type | None] = None

    @classmethod
    def plan_from_config(cls, config: Mapping):
        """The plan recorded by `config()` (the inverse of `plan.to_config()`)."""
        return cls.plan_cls.from_config(config)

    # ---- generic --------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.meta.path

    @property
    def layout(self) -> KernelLayout:
        return self.meta.layout

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return self.meta.layout.shape

    def base_matrix(self):
        """W0 as (*stack, d1, d2) float32 (methods that keep the kernel in `base`)."""
        return self.layout.to_matrix(jnp.asarray(self.base, jnp.float32))

    def weight(self):
        """The adapted W, float32: (*stack, d1, d2)."""
        return self.base_matrix() + self.delta()

    def materialize(self):
        """The adapted kernel in its original layout and dtype."""
        return self.layout.from_matrix(self.weight()).astype(self.layout.dtype)

    def merged_kernel(self):
        """Alias of `materialize` (its name before the protocol), kept for one release."""
        return self.materialize()

    @property
    def entries_per_layer(self) -> int:
        """Trainable values per layer of a stacked kernel (`summary`'s "entries")."""
        return self.num_trainable // max(math.prod(self.layout.stack_shape), 1)

    def notes(self) -> str:
        """Anything `summary` should flag for this target ('' for nothing)."""
        return ""

    @property
    def num_trainable(self) -> int:
        """Trainable scalars in this node (the sizes of its trainable arrays)."""
        total = 0
        for name in self.trainable_fields():
            value = getattr(self, name)
            if value is not None and hasattr(value, "shape"):
                total += math.prod(value.shape)
        return total

    def config(self) -> dict:
        """The node's whole configuration, JSON-able: method, path, layout and options."""
        return {"method": self.method, **self.meta.to_config()}

    def sketch(self) -> np.ndarray:
        """Q ΔW P per layer, float64 (*stack, p, p): a fingerprint of the update ΔW.

        Q: (p, d1) and P: (d2, p) are Gaussian, seeded by the path and shape, so a reload that
        re-creates a different ΔW (another SVD's singular vectors on a degenerate spectrum) is
        detected: each entry of Q D P is N(0, ‖D‖_F²) for a difference D.
        """
        layout = self.layout
        generator = np.random.default_rng([self.meta.key_id, layout.d1, layout.d2])
        q = generator.standard_normal((SKETCH_SIZE, layout.d1))
        p = generator.standard_normal((layout.d2, SKETCH_SIZE))
        delta = np.asarray(jax.device_get(self.delta()), np.float64)
        return q @ delta @ p

    def sketch_mismatch_reason(self) -> str:
        """Why a node rebuilt from a saved record can make another update than the saved one
        (the refusal's wording when its sketch differs). Methods whose rebuild depends on
        more than the record (SVFT: the SVD) say what."""
        return ("The node rebuilt from the saved configuration and trained arrays computes another update: the "
                "base weights or the method's settings differ from training, or the file was edited.")

    def record(self) -> Record:
        """This node's config, trainable arrays (host numpy) and sketch of ΔW."""
        arrays = {}
        for name in self.trainable_fields():
            value = getattr(self, name)
            if value is not None:
                arrays[name] = np.asarray(jax.device_get(value))
        return Record(self.config(), arrays, self.sketch())

    @classmethod
    def from_records(cls, records, kernels: Mapping[str, Any], *, factors=None, where: str = "record",
                     ignore: tuple[str, ...] = ()):
        """Re-create nodes from `records` and the original `kernels` through `build` (batched).

        Args:
          records: `Record`s of this method.
          kernels: {path: original kernel}.
          factors: a factor store for `build` (SVFT).
          where: names the source in error messages (e.g. the file).
          ignore: config keys allowed to differ (e.g. "svd_backend" when the caller overrode it).
        Returns:
          {path: node} with the recorded trainable arrays installed.
        Raises:
          ValueError naming the target and what differs: a config the rebuilt node does not
          reproduce (e.g. a top-k Ω recomputed differently), a trainable array of another
          shape, or a rebuilt update that differs from the recorded sketch.
        """
        plans = [cls.plan_from_config(r.config) for r in records]
        nodes = cls.build(plans, kernels, factors=factors)
        result = {}
        for record, plan in zip(records, plans, strict=True):
            node = nodes[plan.path]
            saved = {k: v for k, v in record.config.items() if k not in ignore}
            rebuilt = {k: v for k, v in node.config().items() if k not in ignore}
            differs = config_differences(saved, rebuilt)
            if differs:
                raise ValueError(f"{where}: target {plan.path!r} re-created with a different configuration ({differs}); the base weights or SVD settings differ from training. Nothing was loaded.")
            node = node.with_trainable(record.arrays, where=where)
            check_sketch(record.sketch, node.sketch(), plan.path, where, node.sketch_mismatch_reason())
            result[plan.path] = node
        return result

    # ---- optional hooks: defaults suit any method; a method overrides what it has ----------
    #: data fields shared by every layer of a stacked kernel, so never sliced per layer
    #: (VeRA's one random pair for all layers).
    shared_fields: ClassVar[tuple[str, ...]] = ()

    def layer_slicer(self):
        """(stacked, rebuild) for a node stacked on its leading axis, or None when it cannot be
        sliced (its uses inside a scan then fall back to the dense kernel).

        `stacked` is a dict of the arrays that carry the leading stack axis (what a scan slices);
        `rebuild(sliced)` turns one slice of it into the per-layer node, whose layout has lost
        that axis. Default: every data field but `shared_fields` carries the stack axis.
        """
        layout = self.meta.layout
        if layout.stack_ndim < 1:
            return None
        shared = self.shared_fields
        stacked = {n: getattr(self, n) for n in self.data_fields() if n not in shared and getattr(self, n) is not None}
        kept = {n: getattr(self, n) for n in shared}
        meta = with_layout(self.meta, one_layer_layout(layout))

        def rebuild(sliced):
            values = {n: sliced.get(n) for n in self.data_fields() if n not in shared}
            return type(self)(**values, **kept, meta=meta)

        return stacked, rebuild

    def take_layer(self, index):
        """Layer `index` (a Python int or a traced integer) of a node stacked on its leading
        axis, as a node of one layer; None when the node cannot be sliced."""
        found = self.layer_slicer()
        if found is None:
            return None
        stacked, rebuild = found
        return rebuild(jax.tree.map(lambda a: a[index], stacked))

    @property
    def spectral_ready(self) -> bool:
        """Whether the node can run `spectral_matmul` exactly (SVFT at full rank). Default: no."""
        return False

    @property
    def spectral_exact(self) -> bool:
        """Whether `spectral_matmul` reproduces this node's W to float32 rounding (read by the
        `spectral` and `auto` strategies). Default: no spectral form."""
        return False

    def spectral_matmul(self, x, *, precision=None, preferred_element_type=None):
        """x Wᵀ without reading W0 (only for `spectral_ready` nodes)."""
        raise NotImplementedError(f"{type(self).__name__} has no spectral form; use matmul.")

    @property
    def sparse_entries(self) -> int | None:
        """Entries of a sparse r-space update per layer, for the cost model (SVFT: |Ω|); None
        for dense factors."""
        return None

    def without_unused_base(self):
        """This node without a stored W0 that no execution strategy would read (SVFT at full
        rank with float32 factors); default: the node itself."""
        return self

    @property
    def has_factors(self) -> bool:
        """Whether the node holds SVD factors of its kernel that a factor store can cache."""
        return False

    @property
    def factors_lossless(self) -> bool:
        """Whether the stored factors are exactly what the SVD computed (same dtype)."""
        return True

    def factor_cache_entry(self, kernel) -> tuple[str, tuple]:
        """(factor_key, factor arrays) of this node over its original `kernel` (`has_factors` only)."""
        raise NotImplementedError(f"{type(self).__name__} holds no factors.")

    def file_tensors(self) -> dict:
        """Extra tensors an adapter file stores for this node beside its trainable arrays
        (SVFT: Ω as saved); {name: numpy array}."""
        return {}

    def with_trainable(self, arrays: Mapping[str, Any], *, where: str = "record"):
        """This node with its trainable arrays replaced by `arrays` (shapes checked)."""
        expected = {n for n in self.trainable_fields() if getattr(self, n) is not None}
        if set(arrays) != expected:
            raise ValueError(f"{where}: target {self.path!r} expects trainable arrays {sorted(expected)}, got {sorted(arrays)}.")
        values = {}
        for name, value in arrays.items():
            current = getattr(self, name)
            if tuple(np.shape(value)) != tuple(current.shape):
                raise ValueError(f"{where}: {self.path}/{name} has shape {tuple(np.shape(value))}, the node expects {tuple(current.shape)}.")
            values[name] = jnp.asarray(value, current.dtype)
        return dataclasses.replace(self, **values)


def one_layer_layout(layout: KernelLayout) -> KernelLayout:
    """The layout of one layer of a stacked kernel: axis 0 removed, the others shifted."""
    return KernelLayout(
        shape=tuple(layout.shape[1:]), dtype=layout.dtype, stack_ndim=layout.stack_ndim - 1,
        in_axes=tuple(a - 1 for a in layout.in_axes), out_axes=tuple(a - 1 for a in layout.out_axes),
    )


def with_layout(meta, layout: KernelLayout):
    """`meta` (a plan, or a meta object around a `plan`) with another kernel layout."""
    if hasattr(meta, "plan") and dataclasses.is_dataclass(meta.plan):
        return dataclasses.replace(meta, plan=dataclasses.replace(meta.plan, layout=layout))
    return dataclasses.replace(meta, layout=layout)


def factor_key(matrix, rank: int, svd_dtype: str, backend: str) -> str:
    """The factor-store key of one target: a digest of what determines its factors — the
    matrix bytes, shape and dtype, the rank, the SVD dtype and the resolved back-end."""
    array = np.ascontiguousarray(np.asarray(matrix))
    h = hashlib.sha256(array.tobytes())
    h.update(repr((array.shape, array.dtype.str, int(rank), svd_dtype, backend)).encode())
    return h.hexdigest()


def config_differences(saved: Mapping, rebuilt: Mapping) -> str:
    """'key: saved → rebuilt' for each top-level key that differs ('' when equal)."""
    keys = sorted(set(saved) | set(rebuilt))
    return "; ".join(f"{k}: {saved.get(k)!r} → {rebuilt.get(k)!r}" for k in keys if saved.get(k) != rebuilt.get(k))


SKETCH_RTOL = 1e-3


def check_sketch(saved: np.ndarray, rebuilt: np.ndarray, path: str, where: str, reason: str | None = None) -> None:
    """Refuse a rebuilt update whose sketch differs from the saved one beyond float rounding.

    `reason`: why the rebuilt node can differ, in words (the node's `sketch_mismatch_reason`)."""
    saved = np.asarray(saved, np.float64)
    rebuilt = np.asarray(rebuilt, np.float64)
    if saved.shape != rebuilt.shape:
        raise ValueError(f"{where}: the update sketch of {path!r} has shape {saved.shape}, the re-created node gives {rebuilt.shape}.")
    axes = (-2, -1)
    error = np.linalg.norm(saved - rebuilt, axis=axes)
    scale = np.maximum(np.linalg.norm(saved, axis=axes), np.linalg.norm(rebuilt, axis=axes))
    bad = error > SKETCH_RTOL * scale + 1e-30
    if np.any(bad):
        worst = float(np.max(error / np.maximum(scale, 1e-30)))
        if reason is None:
            reason = DEGENERATE_SPECTRUM_REASON
        raise ValueError(
            f"{where}: target {path!r} re-creates a different update ΔW (relative difference {worst:.3g} on "
            f"seeded probes). {reason}"
        )


DEGENERATE_SPECTRUM_REASON = (
    "Its singular values are (near-)repeated, so the singular vectors are not unique and this SVD back-end "
    "returned others. Load with the back-end that made the adapter (recorded in the file: svd_backend), or ship "
    "the factors (svft_jax.checkpoint.save_factor_cache) and pass factors=.")


def digest(*arrays) -> str:
    """SHA-256 of arrays' shapes, dtypes and bytes (e.g. of Ω)."""
    h = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


# ---- the trainable set, declared once -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trainable:
    """Marks a leaf trained in full beside the adapters (a new classifier head).

    Created by `apply(..., extra=regex)` or `mark_trainable(tree, regex)`, so the adapted tree
    itself says what trains: `split`, `optimizer`, `summary`, `count_parameters`,
    `save_adapter` and `shard_params` read it. `merge` unwraps it.
    """

    value: Any


jax.tree_util.register_dataclass(Trainable, data_fields=["value"], meta_fields=[])


def is_node(x) -> bool:
    """True for any adapter node — SVFT or a baseline (use as `is_leaf=` in tree maps)."""
    return isinstance(x, AdapterNode)


def is_marker(x) -> bool:
    """True for a `Trainable` marker."""
    return isinstance(x, Trainable)


def is_special(x) -> bool:
    """Nodes and markers: what generic tree maps treat as one leaf."""
    return isinstance(x, AdapterNode | Trainable)
