"""One registry class for every method kind: selections, folds, fold targets, token weightings, calibrations,
allocations, offloads, export formats, clustering algorithms, skip predictors, ...

    SELECTORS = Registry("select", "select(m: LayerMoments, keep: int, seed: int) -> Selection")

    @SELECTORS.register("wanda-sp")
    def select_wanda_sp(m, keep, seed=0): ...

    SELECTORS["wanda-sp"]        # the function
    SELECTORS["nope"]            # NeuroprojError: unknown select 'nope': choose from wanda-sp, ...

A registry is a dict (name → entry) that keeps registration order; looking up an unknown name is the one
"unknown X: choose from …" error of the package. Entries may carry metadata (`register(name, **meta)` sets
attributes on the entry), e.g. whether a fold target needs the dense model's stream.
"""
from __future__ import annotations

from .errors import NeuroprojError


class Registry(dict):
    """Named entries of one kind. `kind` names it in messages ("unknown {kind} 'x': choose from …");
    `signature` documents what every entry is (shown by `describe`)."""

    def __init__(self, kind: str, signature: str = ""):
        super().__init__()
        self.kind, self.signature = kind, signature

    def register(self, name: str, entry=None, **meta):
        """`@registry.register("name")` on a function or class, or `registry.register("name", entry)`."""
        def add(obj):
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            for k, v in meta.items():
                setattr(obj, k, v)
            dict.__setitem__(self, name, obj)
            return obj
        return add if entry is None else add(entry)

    def __missing__(self, name):
        raise NeuroprojError(self.unknown(name))

    def unknown(self, name) -> str:
        return f"unknown {self.kind} {name!r}: choose from {', '.join(self)}"

    def check(self, name) -> str:
        """`name` when it is registered, else the one error."""
        if name not in self:
            raise NeuroprojError(self.unknown(name))
        return name

    def describe(self) -> str:
        return f"{self.kind}: {self.signature} — {', '.join(self)}"

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self)})"
