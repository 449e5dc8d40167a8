"""The harness's one configuration system: frozen dataclasses, filled from the command line.

Every setting of every task is a field of a frozen dataclass with a type annotation and a
default: the loop's `experiments.harness.train.TrainConfig`, and one options dataclass per task
(`experiments.tasks.sentiment.Options`, `experiments.paper.glue.Options`, ...). Validation lives in
each dataclass's `__post_init__`, so a config is checked when it is built, whether it came from
the command line, from a results file or from Python. `parse` is the only command-line reader:

    options, train = config.parse(argv, Options(), TrainConfig(steps=120))
    # --methods=lora_r8,svft_plain  --seeds=0,1  --config.steps=50  (or --steps=50)

Flags are `--name=value` or `--name value`; a bool flag alone means true (`--resume`);
`none` gives None for an optional field; tuples are comma-separated. Fields of the loop's
config may be spelled `--config.name`, and also `--name` where no options field has that name.
An unknown or mistyped flag raises a ValueError that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any

TRAIN_PREFIX = "config."


def _options(annotation) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of an annotation such as `int | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"config fields may be `X | None` only, got {annotation!r}.")
        return args[0], True
    return annotation, False


def convert(flag: str, text: str, annotation) -> Any:
    """A command-line string as a value of `annotation` (int, float, bool, str, tuple[X, ...], X | None).

    Raises:
      ValueError: naming `flag` and the expected type.
    """
    kind, optional = _options(annotation)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return tuple(convert(flag, part.strip(), item) for part in text.split(",") if part.strip())
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{flag} expects a boolean (true/false), got {text!r}.")
    if kind is float and text.strip().lower() in ("inf", "-inf", "nan"):
        raise ValueError(f"{flag} expects a finite float, got {text!r}.")
    try:
        return kind(text)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{flag} expects {getattr(kind, '__name__', kind)}, got {text!r}.") from err


def _is_bool(annotation) -> bool:
    return _options(annotation)[0] is bool


def help_text(*defaults, description: str = "") -> str:
    """Every flag of the given dataclass instances with its type and default."""
    lines = [description.strip(), ""] if description else []
    for index, default in enumerate(defaults):
        hints = typing.get_type_hints(type(default))
        prefix = TRAIN_PREFIX if index and _is_train(default) else ""
        lines.append(f"{type(default).__name__}:")
        for field in dataclasses.fields(default):
            lines.append(f"  --{prefix}{field.name}  ({_type_name(hints[field.name])}, default {getattr(default, field.name)!r})")
    return "\n".join(lines)


def _type_name(annotation) -> str:
    kind, optional = _options(annotation)
    name = getattr(kind, "__name__", str(kind))
    if typing.get_origin(kind) is tuple:
        name = f"comma-separated {typing.get_args(kind)[0].__name__}s"
    return f"{name} or none" if optional else name


def _is_train(default) -> bool:
    return type(default).__name__ == "TrainConfig"


def parse(argv: Sequence[str] | None, *defaults, description: str = "") -> tuple:
    """Override fields of `defaults` (dataclass instances) from command-line flags.

    Args:
      argv: flags without the program name (None: `sys.argv[1:]`).
      defaults: one or more dataclass instances; a `TrainConfig` among them also answers to
        `--config.<name>`. A bare `--name` goes to the one instance that has that field (the
        first one where two do).
      description: printed above the flag list by `--help`.
    Returns:
      New instances (`dataclasses.replace`, so validated again), in the order given.
    Raises:
      ValueError: for an unknown flag (listing the valid ones), a malformed or mistyped value,
        or a value the dataclass refuses. `--help` prints the flags and raises SystemExit(0).
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    hints = [typing.get_type_hints(type(default)) for default in defaults]
    changes: list[dict] = [{} for _ in defaults]
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg in ("-h", "--help"):
            print(help_text(*defaults, description=description))
            raise SystemExit(0)
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected a flag --name=value, got {arg!r}.")
        key, has_value, text = arg[2:].partition("=")
        owner = None
        if key.startswith(TRAIN_PREFIX):
            owner = next((i for i, d in enumerate(defaults) if _is_train(d) and key[len(TRAIN_PREFIX):] in hints[i]), None)
            name = key[len(TRAIN_PREFIX):]
        else:
            name = key.replace("-", "_")
            owner = next((i for i, h in enumerate(hints) if name in h), None)
        if owner is None:
            valid = sorted(f"--{TRAIN_PREFIX if _is_train(d) else ''}{n}" for d, h in zip(defaults, hints, strict=True) for n in h)
            bare = key[len(TRAIN_PREFIX):] if key.startswith(TRAIN_PREFIX) else name
            raise ValueError(f"unknown config field {bare!r} (--{key}); valid flags: {', '.join(valid)}.")
        annotation = hints[owner][name]
        if not has_value:
            if _is_bool(annotation) and (index == len(argv) or argv[index].startswith("--")):
                text = "true"
            elif index < len(argv) and not argv[index].startswith("--"):
                text = argv[index]
                index += 1
            else:
                raise ValueError(f"--{key} needs a value (--{key}=...).")
        changes[owner][name] = convert(f"--{key}", text, annotation)
    return tuple(dataclasses.replace(default, **change) for default, change in zip(defaults, changes, strict=True))


def to_dict(config) -> dict:
    """A dataclass config as a JSON-ready dict (tuples become lists)."""
    return json_ready(dataclasses.asdict(config))


def from_dict(cls, values: dict):
    """`cls(**values)` after checking the keys, with lists turned back into tuples.

    Raises:
      ValueError: naming the unknown keys (e.g. a results file from another version).
    """
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}; known: {sorted(names)}.")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def json_ready(value):
    """Nested dicts/lists/tuples of numbers, strings and numpy values as plain JSON types."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if hasattr(value, "__array__"):
        import numpy as np

        array = np.asarray(value)
        return array.item() if array.ndim == 0 else array.tolist()
    return value


def flags_given(argv: Sequence[str] | None) -> set[str]:
    """The bare field names set on a command line (`--config.steps=3 --seed 1` -> {'steps', 'seed'})."""
    import sys

    names = set()
    for arg in (sys.argv[1:] if argv is None else argv):
        if arg.startswith("--"):
            key = arg[2:].partition("=")[0]
            names.add(key.removeprefix(TRAIN_PREFIX).replace("-", "_"))
    return names
