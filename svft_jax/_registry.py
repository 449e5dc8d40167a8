"""One registry mechanism for everything the library looks up by name: patterns, adapter
methods and execution strategies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, registered once. `kind` names the registry in error messages.

    A registry is read-only for users except through `register`: re-registering a name is an
    error (a silently replaced pattern or method would change what existing code means).
    """

    def __init__(self, kind: str, argument: str):
        self.kind = kind          # e.g. "pattern"
        self.argument = argument  # the keyword users pass the name as, e.g. "pattern"
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} name must be a non-empty string, got {name!r}.")
        if name in self._items:
            raise ValueError(f"A {self.kind} named {name!r} is already registered.")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> T:
        """Remove and return `name` (for tests and interactive sessions that redefine one)."""
        return self._items.pop(self.get(name) and name)

    def get(self, name: str) -> T:
        if not isinstance(name, str):
            raise TypeError(f"`{self.argument}` must be a string, got {type(name).__name__}.")
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise ValueError(f"Unknown {self.kind} {name!r}; choose one of: {known}.") from None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._items))

    def __contains__(self, name) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
