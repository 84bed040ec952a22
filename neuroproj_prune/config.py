"""One config dataclass per stage, whose fields make the CLI flags, the recipe section and the API keywords.

    @dataclass
    class MyConfig(Config):
        what = "my"                                      # error messages say "unknown my setting(s)"
        steps: int = opt(10, "how many steps", ge=1)     # → --steps, recipe key `steps`, keyword `steps=`
        def check(self): ...                             # rules between fields (after the declared ones)

A field declares its type (from the default, or `kind`; `list` for comma lists of `item`s), its allowed values
(`choices`: a tuple or a callable returning a registry) and its range (`ge`, `gt`, `le`, `lt`; `why` says what a
value out of range would do). `Config.validate` checks all of them, generically, when a config is made: once,
before any model is loaded. It gives `make` (None means: the default), `replace`, `to_dict`, `recipe_defaults`,
`add_arguments` (argparse flags) and `from_args`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import field

from .errors import NeuroprojError
from .registry import Registry


class ConfigError(NeuroprojError):
    """A bad config value; `field` names the setting (recipes say `SECTION.FIELD`, the CLI `--field`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def opt(default, help, choices=None, kind=None, optional=False, *, item=None, ge=None, gt=None, le=None, lt=None,
        why=None):
    """A config field: its default, its help text, its allowed values (a tuple, or a callable returning a
    registry), its value type when the default does not say (None defaults; `list` with `item` for comma lists),
    whether None is allowed (always for None defaults), and its range (`ge` ≤ v, `gt` < v, v ≤ `le`, v < `lt`)."""
    return field(default=default, metadata={"help": help, "choices": choices, "kind": kind, "item": item,
                                            "optional": optional or default is None, "ge": ge, "gt": gt, "le": le,
                                            "lt": lt, "why": why})


def _choices(md):
    return md["choices"]() if callable(md["choices"]) else md["choices"]


def _kind(f) -> type:
    return f.metadata["kind"] or (list if isinstance(f.default, tuple) else type(f.default))


def _range_text(md) -> str | None:
    lo = f"[{md['ge']}" if md["ge"] is not None else f"({md['gt']}" if md["gt"] is not None else None
    hi = f"{md['le']}]" if md["le"] is not None else f"{md['lt']})" if md["lt"] is not None else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return f"at least {md['ge']}" if md["ge"] is not None else f"> {md['gt']}"
    if hi:
        return f"at most {md['le']}" if md["le"] is not None else f"< {md['lt']}"
    return None


def _in_range(v, md) -> bool:
    return ((md["ge"] is None or v >= md["ge"]) and (md["gt"] is None or v > md["gt"])
            and (md["le"] is None or v <= md["le"]) and (md["lt"] is None or v < md["lt"]))


def _scalar(name: str, kind, v):
    """`v` as a value of `kind` (ints given as 3.0 become 3), or a ConfigError."""
    if kind is bool:
        if not isinstance(v, bool):
            raise ConfigError(name, f"{name} must be true or false, got {v!r}")
        return v
    if kind is int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
            raise ConfigError(name, f"{name} must be a whole number, got {v!r}")
        return int(v)
    if kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(name, f"{name} must be a finite number, got {v!r}")
        return float(v)
    if isinstance(v, os.PathLike):   # a path given as a Path
        return os.fspath(v)
    ints = isinstance(v, (list, tuple)) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    if ints or (isinstance(v, int) and not isinstance(v, bool)):   # a layer spec given as indices: "0,3"
        return ",".join(str(x) for x in (v if ints else [v]))
    if not isinstance(v, str):
        raise ConfigError(name, f"{name} must be a string, got {v!r}")
    return v


class Config:
    """Base of the stage configs (dataclasses). Validated when made; `replace(**changes)` makes a validated
    copy. Subclasses set `what` (for messages) and put their cross-field rules in `check`."""

    what = "config"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Type, choices and range of every field (comma lists become tuples), then the subclass's `check`."""
        for f in dataclasses.fields(self):
            v, md = getattr(self, f.name), f.metadata
            kind = _kind(f)
            if kind is list and md["optional"] and isinstance(v, (str, list, tuple)) and not str(v).strip("[](), "):
                v = None   # an empty list of an optional list: none given
                setattr(self, f.name, None)
            if v is None and md["optional"]:
                continue
            if kind is list:
                items = [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v
                if not isinstance(items, (list, tuple)) or not items:
                    raise ConfigError(f.name, f"{f.name} must be a non-empty comma list, got {v!r}")
                if md["item"] in (int, float):   # "0.1,0.2" from the command line: numbers
                    items = [_number(f.name, x) for x in items]
                values = tuple(_scalar(f.name, md["item"] or str, x) for x in items)
            else:
                values = (_scalar(f.name, kind, v),)
            choices = _choices(md)
            for x in values:
                if choices is not None and x not in choices:
                    raise ConfigError(f.name, choices.unknown(x) if isinstance(choices, Registry) else
                                      f"unknown {f.name.replace('_', ' ')} {x!r}: choose from {', '.join(choices)}")
                if kind is not bool and isinstance(x, (int, float)) and not _in_range(x, md):
                    why = f": {md['why']}" if md["why"] else ""
                    raise ConfigError(f.name, f"{f.name} must be {_range_text(md)} (got {x}){why}")
            setattr(self, f.name, values if kind is list else values[0])
        self.check()

    def check(self) -> None:
        """Rules between fields; raise ConfigError(field, message)."""

    def refuse_together(self, a: str, b: str) -> None:
        """ConfigError when both settings `a` and `b` are given (not None)."""
        if getattr(self, a) is not None and getattr(self, b) is not None:
            raise ConfigError(b, f"give {a} or {b}, not both")

    # -- construction from the outside
    @classmethod
    def make(cls, **given):
        """From keyword arguments (None means: the default)."""
        return cls(**cls.given_settings(given))

    @classmethod
    def given_settings(cls, given: dict) -> dict:
        """`given` without its None values; an unknown name is a ConfigError."""
        given = {k: v for k, v in given.items() if v is not None}
        unknown = set(given) - set(cls.field_names())
        if unknown:
            raise ConfigError(sorted(unknown)[0], f"unknown {cls.what} setting(s) {sorted(unknown)}: known are "
                              f"{', '.join(cls.field_names())}")
        return given

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict:
        """Every field and its default (as the config holds it: comma lists as tuples)."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def changed(self) -> dict:
        """The settings that differ from their defaults (what a command has to say to repeat this config)."""
        defaults = self.recipe_defaults()
        return {k: v for k, v in self.to_dict().items() if v != defaults[k]}

    @classmethod
    def recipe_defaults(cls, exclude=()) -> dict:
        """The recipe section: every field and its default (lists as YAML lists)."""
        return {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
                for f in dataclasses.fields(cls) if f.name not in exclude}

    @classmethod
    def add_arguments(cls, parser, exclude=(), defaults: dict | None = None) -> None:
        """One `--flag` per field (`max_shift` → `--max-shift`), default None so that unset flags keep the
        config's defaults (`from_args`); the help says the choices, the range and the default."""
        for f in dataclasses.fields(cls):
            if f.name in exclude:
                continue
            md = f.metadata
            kind = _kind(f)
            choices = _choices(md)
            default = (defaults or {}).get(f.name, f.default)
            if isinstance(default, tuple):
                default = ",".join(str(x) for x in default)
            rng = _range_text(md)
            help = (md["help"] + (f" ({', '.join(choices)})" if choices else "") + (f"; {rng}" if rng else "")
                    + (f"; default {default}" if default is not None else ""))
            flag = "--" + f.name.replace("_", "-")
            if kind is bool:
                parser.add_argument(flag, dest=f.name, action="store_true", default=None, help=help)
            else:
                parser.add_argument(flag, dest=f.name, type=str if kind is list else kind, default=None, help=help,
                                    metavar=f.name.upper())

    @classmethod
    def from_args(cls, args, exclude=(), **extra):
        """The config of parsed CLI arguments (flags made by `add_arguments`) plus `extra` settings; the fields in
        `exclude` are left at their defaults (their flags, if any, belong to another config of the command)."""
        given = {n: getattr(args, n) for n in cls.field_names() if hasattr(args, n) and n not in exclude}
        given.update(extra)
        return cls.make(**given)


def _number(name: str, x):
    if isinstance(x, str):
        try:
            return float(x) if any(c in x for c in ".eE") or x.lower() in ("nan", "inf", "-inf") else int(x)
        except ValueError:
            raise ConfigError(name, f"{name} must be a comma list of numbers, got {x!r}") from None
    return x
