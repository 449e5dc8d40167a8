"""Parameter paths: '/'-joined key strings used by every regex in the public API."""

from __future__ import annotations

import re
from typing import Any

PyTree = Any


def key_to_str(key: Any) -> str:
    """One path entry (DictKey, SequenceKey, GetAttrKey, FlattenedIndexKey) as a string."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_str(path: tuple) -> str:
    """A `jax.tree_util` key path as 'encoder/layer/0/attention/self/query/kernel'."""
    return "/".join(key_to_str(k) for k in path)


def compile_regex(pattern: str | None, name: str) -> re.Pattern | None:
    """Compile a user regex, raising a ValueError that names the argument on a syntax error."""
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise TypeError(f"`{name}` must be a regex string or None, got {type(pattern).__name__}.")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"`{name}`={pattern!r} is not a valid regular expression: {err}.") from err


def matches(regex: re.Pattern | None, path: str) -> bool:
    """`re.fullmatch` for a '/'-joined path; None matches nothing."""
    return regex is not None and regex.fullmatch(path) is not None
