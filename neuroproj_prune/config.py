"""One config dataclass per stage, whose fields make the CLI flags, the recipe section and the API keywords.

    @dataclass
    class MyConfig(Config):
        what = "my"                                      # error messages say "unknown my setting(s)"
        steps: int = opt(10, "how many steps")           # → --steps, recipe key `steps`, keyword `steps=`
        def check(self): ...                             # rules between fields (after the type checks)

`Config` gives the type checks (from the default's type or `kind`, choices from a tuple or a registry
callable), `make` (None means: the default), `replace`, `to_dict`, `recipe_defaults`, `add_arguments` and
`from_args`. `PruneConfig` (prune.py) and `RecoverConfig` (recover.py) are such configs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import field

from .errors import NeuroprojError
from .registry import Registry


class ConfigError(NeuroprojError):
    """A bad config value; `field` names the setting (recipes say `SECTION.FIELD`, the CLI `--field`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def opt(default, help, choices=None, kind=None, optional=False):
    """A config field: its default, its help text, its allowed values (a tuple, or a callable returning a
    registry), its value type when the default does not say (None defaults), and whether None is allowed
    (always for None defaults)."""
    return field(default=default, metadata={"help": help, "choices": choices, "kind": kind,
                                            "optional": optional or default is None})


def _choices(md):
    return md["choices"]() if callable(md["choices"]) else md["choices"]


class Config:
    """Base of the stage configs (dataclasses). Validated when made; `replace(**changes)` makes a validated
    copy. Subclasses set `what` (for messages) and put their cross-field rules in `check`."""

    what = "config"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Types and choices of every field (ints given as 3.0 become 3), then the subclass's `check`."""
        for f in dataclasses.fields(self):
            v, md = getattr(self, f.name), f.metadata
            kind = md["kind"] or type(f.default)
            if v is None and md["optional"]:
                continue
            if kind is bool:
                if not isinstance(v, bool):
                    raise ConfigError(f.name, f"{f.name} must be true or false, got {v!r}")
                continue
            if kind is int:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
                    raise ConfigError(f.name, f"{f.name} must be a whole number, got {v!r}")
                setattr(self, f.name, int(v))
            elif kind is float:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ConfigError(f.name, f"{f.name} must be a finite number, got {v!r}")
                setattr(self, f.name, float(v))
            elif not isinstance(v, str):
                raise ConfigError(f.name, f"{f.name} must be a string, got {v!r}")
            choices = _choices(md)
            if choices is not None and v not in choices:
                raise ConfigError(f.name, choices.unknown(v) if isinstance(choices, Registry) else
                                  f"unknown {f.name.replace('_', ' ')} {v!r}: choose from {', '.join(choices)}")
        self.check()

    def check(self) -> None:
        """Rules between fields and value ranges; raise ConfigError(field, message)."""

    def at_least(self, limits: dict) -> None:
        """ConfigError unless each named field (when not None) is >= its lower limit."""
        for name, lo in limits.items():
            v = getattr(self, name)
            if v is not None and v < lo:
                raise ConfigError(name, f"{name} must be at least {lo} (got {v})")

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

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def recipe_defaults(cls, exclude=()) -> dict:
        """The recipe section: every field and its default."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in exclude}

    @classmethod
    def add_arguments(cls, parser, exclude=(), defaults: dict | None = None) -> None:
        """One `--flag` per field (`max_shift` → `--max-shift`), default None so that unset flags keep the
        config's defaults (`from_args`)."""
        for f in dataclasses.fields(cls):
            if f.name in exclude:
                continue
            md = f.metadata
            kind = md["kind"] or type(f.default)
            choices = _choices(md)
            default = (defaults or {}).get(f.name, f.default)
            help = md["help"] + (f" ({', '.join(choices)})" if choices else "") + \
                (f"; default {default}" if default is not None else "")
            flag = "--" + f.name.replace("_", "-")
            if kind is bool:
                parser.add_argument(flag, dest=f.name, action="store_true", default=None, help=help)
            else:
                parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help)

    @classmethod
    def from_args(cls, args, **extra):
        """The config of parsed CLI arguments (flags made by `add_arguments`) plus `extra` settings."""
        given = {n: getattr(args, n) for n in cls.field_names() if hasattr(args, n)}
        given.update(extra)
        return cls.make(**given)
