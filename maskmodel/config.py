"""Frozen job configs and the command lines derived from them.

Each job has one frozen dataclass; :func:`build_parser` turns its fields into
``--flags`` (the help text is the field's ``help`` metadata), and
:func:`parse_config` turns parsed arguments back into the dataclass. A flag
and a field therefore cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, help: str, choices: Sequence[Any] | None = None,
          minimum: float | None = None, maximum: float | None = None, above: float | None = None,
          below: float | None = None, multiple_of: int | None = None, positional: bool = False,
          path: bool | Sequence[str] = False, **kwargs: Any) -> Any:
    """A dataclass field carrying its CLI help text and the values it accepts.

    ``minimum`` / ``maximum`` are inclusive bounds, ``above`` / ``below`` exclusive ones,
    ``multiple_of`` a step, ``choices`` the allowed values (of each item, for a tuple field); all are
    checked by :func:`check_fields` on construction (each :class:`JobConfig`), so each bound is
    declared once, next to its field, and its message is written once, there. ``path=True`` marks a
    field holding a URI or local path (or a tuple of them) that :func:`resolve_paths` makes absolute;
    ``path=("imagenet", "none")`` does the same but leaves those keywords as they are.
    """
    metadata = {"help": help, "choices": choices, "positional": positional,
                "path": tuple(path) if not isinstance(path, bool) else path,
                "bounds": {k: v for k, v in (("minimum", minimum), ("maximum", maximum), ("above", above),
                                             ("below", below), ("multiple_of", multiple_of)) if v is not None}}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _bound_words(bounds: dict[str, float]) -> str:
    """``{"minimum": 0, "below": 1}`` -> ``"in [0, 1)"``; one bound -> ``"at least 0"``, ``"above 0"``..."""
    low = ("[", bounds["minimum"]) if "minimum" in bounds else ("(", bounds["above"]) if "above" in bounds else None
    high = ("]", bounds["maximum"]) if "maximum" in bounds else (")", bounds["below"]) if "below" in bounds else None
    if low and high:
        words = f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    elif low:
        words = f"at least {low[1]:g}" if low[0] == "[" else f"above {low[1]:g}"
    elif high:
        words = f"at most {high[1]:g}" if high[0] == "]" else f"below {high[1]:g}"
    else:
        words = ""
    if "multiple_of" in bounds:
        words = f"a multiple of {bounds['multiple_of']}" + (f" {words}" if words else "")
    return words


def check_fields(config: Any) -> None:
    """Check every field of ``config`` against its declared bounds and choices; :class:`ValueError` names the flag.

    The one place a field's declared limits (:func:`field`) are enforced, with one message shape:
    ``--image-size must be a multiple of 32 in [64, 2048], got 100``.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        bounds, choices = f.metadata.get("bounds") or {}, f.metadata.get("choices")
        if choices and value is not None:
            bad = [v for v in (value if isinstance(value, (tuple, list)) else (value,)) if v not in choices]
            if bad:
                raise ValueError(f"{_flag(f.name)} must be one of {', '.join(map(str, choices))}, got {bad[0]}")
        if not bounds or value is None:
            continue
        ok = (value >= bounds.get("minimum", value) and value <= bounds.get("maximum", value)
              and ("above" not in bounds or value > bounds["above"])
              and ("below" not in bounds or value < bounds["below"])
              and ("multiple_of" not in bounds or value % bounds["multiple_of"] == 0))
        if not ok:
            raise ValueError(f"{_flag(f.name)} must be {_bound_words(bounds)}, got {value:g}")


class JobConfig:
    """Base of every job's frozen dataclass config: paths made absolute, then every field checked.

    Construction runs :func:`resolve_paths`, :func:`check_fields` (the bounds and choices declared
    next to each field), then :meth:`validate`: a subclass overrides only that, and only for rules
    that tie two fields together. Raises :class:`ValueError` (the CLI turns it into exit 2).
    """

    def __post_init__(self) -> None:
        resolve_paths(self)
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Rules across fields (none here); raise :class:`ValueError` naming the flags."""


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative local path made absolute against the current working directory.

    ``runs/r1`` and ``~/runs/r1`` become ``/cwd/runs/r1`` and ``/home/me/runs/r1``;
    ``file://runs/r1`` becomes ``file:///cwd/runs/r1``; other schemes and ``""`` are returned as is.
    """
    if not uri:
        return uri
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    scheme, rest = uri.split("://", 1)
    if scheme.lower() == "file":
        return "file://" + os.path.abspath(os.path.expanduser(rest))
    return uri


def resolve_paths(config: Any) -> None:
    """Make every ``path=`` field of the frozen dataclass ``config`` absolute, in place.

    Called first thing on construction of each :class:`JobConfig` (see the module docstring for why).
    Idempotent: an absolute path stays the same, so re-building a config on a worker changes nothing.
    """
    for f in dataclasses.fields(config):
        marker = f.metadata.get("path")
        if not marker:
            continue
        keep = marker if isinstance(marker, tuple) else ()
        value = getattr(config, f.name)
        resolve = (lambda u: u if u in keep else absolute_uri(u))
        if isinstance(value, str):
            object.__setattr__(config, f.name, resolve(value))
        elif isinstance(value, (tuple, list)):
            object.__setattr__(config, f.name, type(value)(resolve(v) for v in value))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def build_parser(cls: type, *, prog: str | None = None, description: str | None = None,
                 epilog: str | None = None) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one option per field of dataclass ``cls``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(cls)
    own = cls.__dict__.get("__annotations__", {})  # a job's own options first, then those it shares (inherited)
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        if not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        meta = f.metadata
        help_text = meta.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if meta.get("positional"):
            parser.add_argument(f.name, help=help_text, nargs="?" if not required else None, default=default)
            continue
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        kwargs: dict[str, Any] = {"help": help_text, "dest": f.name}
        if typing.get_origin(tp) in (tuple, list):
            (item_tp, *_rest) = typing.get_args(tp) or (str,)
            kwargs.update(nargs="+", type=item_tp)
        elif tp in (int, float, str):
            kwargs["type"] = tp
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
        if required:
            kwargs["required"] = True
            kwargs["metavar"] = "URI" if "uri" in help_text.lower() or f.name in ("data", "output", "input", "model") else None
            if kwargs["metavar"] is None:
                del kwargs["metavar"]
        else:
            kwargs["default"] = default
            notes = ([f"default: {default}"] if default not in (None, "") else []) + \
                ([_bound_words(meta["bounds"])] if meta.get("bounds") else [])
            kwargs["help"] = f"{help_text} ({'; '.join(notes)})" if notes else help_text
        parser.add_argument(_flag(f.name), **kwargs)
    # Not a config field: how much Ray says on the console (read by maskmodel.runtime.cli.run before parsing).
    parser.add_argument("--verbose", action="store_true", dest="_verbose",
                        help="also show Ray's own INFO logs (execution plans, checkpoints) on the console")
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None = None, **parser_kwargs: Any) -> T:
    """Parse ``argv`` into a frozen ``cls``; invalid values exit with argparse's usage error."""
    parser = build_parser(cls, **parser_kwargs)
    ns = parser.parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        tp, _ = _unwrap_optional(hints[name])
        if typing.get_origin(tp) is tuple and value is not None:
            values[name] = tuple(value)
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
