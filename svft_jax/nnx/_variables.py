"""The adapter's arrays as NNX variables the ecosystem already understands.

On the module that owns an adapted weight `w`, each array field of the adapter node becomes an
attribute `w_<method>_<field>` (as qwix names `w_lora_a`):

  trainable fields (SVFT's M and gate, LoRA's A and B, DoRA's magnitude, VeRA's scales)
      plain `nnx.LoRAParam`s (as qwix's LoRA A and B), told apart from other LoRAParams by
      their `adapter_method` metadata (`AdapterParam` is that test): `nnx.Optimizer(model, tx,
      wrt=nnx.LoRAParam)`, `nnx.state(model, nnx.LoRAParam)` and Tunix's `PeftTrainer` (which
      switches to LoRA mode when it finds a LoRAParam) train exactly these, and Tunix's
      sampler takes `nnx.state(model, nnx.LoRAParam)` as a LoRA-only weight sync (it checks
      the exact type);
  frozen fields (SVFT's U, s, V; VeRA's shared random pair)
      `AdapterFactor`, a plain `nnx.Variable` (not a Param): no optimizer, gradient filter or
      Param checkpoint touches them;
  the weight itself stays the module's own `nnx.Param`, untouched (it is W0).

Metadata (hashable, so it lives in the graphdef and survives split/merge/clone):
  every adapter variable: `adapter_method`, `adapter_field`;
  trainable ones also: `adapter_meta` (the node's whole static description — layout, options,
  SVFT's Ω as static indices), `adapter_strategy`, `describe` ('svft-banded(d=2)', 'lora(α=16)')
  and, for SVFT, `omega` (an `Omega`: the pattern and Ω's row and column indices into M).
  `out_sharding`: U and V inherit the weight's out/in axis names (stacked axes too), M is
  replicated (`AdapterNode.axis_roles`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from svft_jax.core._protocol import METHODS


def _is_adapter_lora(value) -> bool:
    """A plain `nnx.LoRAParam` that `install` made (it carries `adapter_method`)."""
    if not isinstance(value, nnx.LoRAParam) or not hasattr(value, "get_metadata"):
        return False
    return "adapter_method" in value.get_metadata()


class _AdapterParamType(type(nnx.LoRAParam)):
    def __instancecheck__(cls, instance):
        return _is_adapter_lora(instance)


class AdapterParam(nnx.LoRAParam, metaclass=_AdapterParamType):
    """A filter for the adapters' trainable arrays (SVFT's M, LoRA's A and B, ...).

    Those arrays are plain `nnx.LoRAParam`s (Tunix's sampler accepts a LoRA-only state of the
    exact type `nnx.LoRAParam` only) told apart by their `adapter_method` metadata. This name is
    kept for one release as that test: `isinstance(v, AdapterParam)` and `nnx.state(model,
    AdapterParam)` select them (and no other LoRAParam); no variable is of this class.
    """


class AdapterFactor(nnx.Variable):
    """A frozen adapter array (SVFT's U, s, V; VeRA's shared pair): not an `nnx.Param`."""


def is_adapter_variable(value) -> bool:
    return isinstance(value, AdapterFactor) or _is_adapter_lora(value)


def attribute_name(weight: str, method: str, field: str) -> str:
    return f"{weight}_{method}_{field}"


def variable_value(variable):
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


@dataclasses.dataclass(frozen=True)
class Slot:
    """One adapted weight of a live model: where it is and its adapter variables.

    Attributes:
      path: the weight's '/'-joined path ('layers/0/attn/q_proj/w').
      module: the module that owns it; weight: its attribute name.
      method: adapter method name; meta: the node's static description; strategy: its
        execution strategy; fields: {field: variable}.
    """

    path: str
    module: Any
    weight: str
    method: str
    meta: Any
    strategy: str
    fields: dict

    def node(self, weight_value=None):
        """The adapter node over the variables' current values (tracers under a transform)."""
        node_cls = METHODS.get(self.method)
        values = {name: None for name in node_cls.data_fields()}
        values.update({name: variable_value(var) for name, var in self.fields.items()})
        if "base" in values:
            keep = getattr(self.meta, "keep_base", True)
            base = variable_value(getattr(self.module, self.weight)) if weight_value is None else weight_value
            values["base"] = base if keep else None
        return node_cls(**values, meta=self.meta)


def _sharding_names(base_names, layout, roles, ndim: int):
    """out_sharding of a field with `roles` (trailing axes) from the kernel's own names."""
    if base_names is None or roles is None:
        return None if base_names is None else (None,) * ndim
    names = tuple(base_names) + (None,) * (len(layout.shape) - len(base_names))
    leading = ndim - len(roles)
    stack = tuple(names[a] for a in range(layout.stack_ndim))[:leading]
    stack += (None,) * (leading - len(stack))
    # A flattened (out) or (in) axis inherits the name of its major (first) kernel axis: that
    # shards whole contiguous blocks of the flattened axis, as the kernel's own sharding does.
    by_role = {"out": names[layout.out_axes[0]], "in": names[layout.in_axes[0]], None: None}
    return stack + tuple(by_role[role] for role in roles)


def _placed(value, weight_value, names):
    """`value` put on the weight's mesh with `names`, when the weight is a NamedSharding array."""
    sharding = getattr(weight_value, "sharding", None)
    if names is None or not isinstance(sharding, jax.sharding.NamedSharding):
        return value
    return jax.device_put(value, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*names)))


@dataclasses.dataclass(frozen=True)
class Omega:
    """SVFT's Ω as variable metadata: the pattern text and the exact indices into M (r × r)."""

    pattern: str
    rank: int
    rows: Any
    cols: Any

    def __str__(self) -> str:
        n = self.rows.array.shape[-1]
        return f"{self.pattern}: {n} of {self.rank}×{self.rank}"


def install(module, weight: str, node, strategy: str, shared: dict) -> list[str]:
    """Attach `node`'s arrays to `module` as adapter variables; returns the attribute names.

    `shared` maps id(array) -> variable across calls, so an array that several nodes hold (VeRA's
    shared pair) becomes one variable that NNX shares between modules.
    """
    weight_var = getattr(module, weight)
    weight_value = variable_value(weight_var)
    base_names = weight_var.get_metadata().get("out_sharding")
    trainable = set(node.trainable_fields())
    method, meta = node.method, node.meta
    names = []
    for field in node.data_fields():
        value = getattr(node, field)
        if field == "base" or value is None:
            continue
        attr = attribute_name(weight, method, field)
        if attr in vars(module):
            raise ValueError(f"module attribute {attr!r} already exists beside weight {weight!r}; the model is already adapted (merge it first) or uses that name.")
        if field not in trainable and id(value) in shared:
            variable = shared[id(value)]
        else:
            roles = type(node).axis_roles.get(field)
            sharding = _sharding_names(base_names, meta.layout, roles, value.ndim)
            metadata = {"adapter_method": method, "adapter_field": field}
            if sharding is not None:
                metadata["out_sharding"] = sharding
            if field in trainable:
                metadata.update(adapter_meta=meta, adapter_strategy=strategy, describe=node.describe())
                if hasattr(meta, "rows"):  # a method with a sparse pattern (SVFT) records Ω itself
                    metadata["omega"] = Omega(node.describe(), int(meta.rank), meta.rows, meta.cols)
            kind = nnx.LoRAParam if field in trainable else AdapterFactor
            # eager_sharding=False: the value is placed here from the weight's own sharding; flax
            # must not demand a mesh context for the names (Tunix turns eager sharding off too).
            variable = kind(_placed(value, weight_value, sharding), eager_sharding=False, **metadata)
            if field not in trainable:
                shared[id(value)] = variable
        setattr(module, attr, variable)
        names.append(attr)
    return names


def slots(model) -> dict[str, Slot]:
    """{weight path: Slot} for every adapted weight of `model`, read from its variables."""
    found: dict[str, Slot] = {}
    for parts, module in nnx.iter_modules(model):
        prefix = "/".join(map(str, parts))
        by_weight: dict[str, dict] = {}
        for attr, value in vars(module).items():
            if not is_adapter_variable(value):
                continue
            metadata = value.get_metadata()
            method, field = metadata["adapter_method"], metadata["adapter_field"]
            suffix = f"_{method}_{field}"
            weight = attr[: -len(suffix)]
            entry = by_weight.setdefault(weight, {"method": method, "fields": {}})
            entry["fields"][field] = value
            if "adapter_meta" in metadata:
                entry["meta"], entry["strategy"] = metadata["adapter_meta"], metadata["adapter_strategy"]
        for weight, entry in by_weight.items():
            path = f"{prefix}/{weight}" if prefix else weight
            found[path] = Slot(path, module, weight, entry["method"], entry["meta"], entry["strategy"], entry["fields"])
    return found


def remove(slot: Slot) -> None:
    """Delete `slot`'s adapter variables from its module."""
    for field in slot.fields:
        delattr(slot.module, attribute_name(slot.weight, slot.method, field))
