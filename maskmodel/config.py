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
          positional: bool = False, path: bool | Sequence[str] = False, **kwargs: Any) -> Any:
    """A dataclass field carrying its CLI help text (and optional choices).

    ``path=True`` marks a field holding a URI or local path (or a tuple of them) that
    :func:`resolve_paths` makes absolute; ``path=("imagenet", "none")`` does the same but leaves
    those keywords as they are.
    """
    metadata = {"help": help, "choices": choices, "positional": positional,
                "path": tuple(path) if not isinstance(path, bool) else path}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


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

    Called first thing in each job config's ``__post_init__`` (see the module docstring for why).
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
    for f in dataclasses.fields(cls):
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
            kwargs["help"] = f"{help_text} (default: {default})" if default not in (None, "") else help_text
        parser.add_argument(_flag(f.name), **kwargs)
    # Not a config field: how much Ray says on the console (read by maskmodel.cli.run before parsing).
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
