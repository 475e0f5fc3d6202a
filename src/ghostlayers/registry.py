"""A name → object table for the things users pick by name (recovery methods, selection criteria), filled by a class
decorator, refusing an unknown name in one line that lists the known ones. No torch."""

from __future__ import annotations

from typing import Any

from .errors import GhostlayersError


class Registry(dict[str, Any]):
    """`@registry.add` on a class with a `name` registers one instance of it; `find(name)` looks one up."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def add(self, cls: type) -> type:
        self[cls.name] = cls()
        return cls

    def find(self, name: str) -> Any:
        if name not in self:
            raise GhostlayersError(f"unknown {self.what} {name!r}: use one of {', '.join(self)}")
        return self[name]
