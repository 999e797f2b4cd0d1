"""Settings declared once: a config dataclass field carries its type, default and help text,
and the command-line flags and the argument lists of child processes are generated from it.

    @dataclass(frozen=True, kw_only=True)
    class BlockConfig(Settings):
        block_size: int = setting(16, "tokens per KV cache block", min=1, max=1024)

`add_arguments(parser, WorkerConfig)` declares `--block-size` (type int, default 16, that
help); `from_args(WorkerConfig, namespace)` builds the config back from the parsed flags;
`to_argv(config, WorkerConfig)` writes the flags a `tessera worker` child needs to receive the
values `config` holds (only those that differ from the child's defaults). A setting's
argparse `dest` is its field name, so `args.block_size` and `config.block_size` agree.
Building a config checks its bounds (`Settings.__post_init__`), from flags or from code alike
(`LLM(model, block_size=0)` fails as `--block-size 0` does).

Booleans are switches: `--enforce-eager` for a False default, `--no-prefix-caching` for a True
one (`enable_prefix_caching`). `X | None` takes an X or is left unset; `tuple[str, ...]` is
written comma-separated. A setting with `cli=False` is a field only (set by code, not flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
            short: str | None = None, choices: Iterable[Any] | None = None,
            metavar: str | None = None, cli: bool = True, arg_type: Callable | None = None,
            convert: Callable | None = None, min: float | None = None,
            max: float | None = None) -> Any:
    """A config field with what its flag needs. `flag` overrides the name derived from the
    field (`--block-size`), `short` adds an alias (`-tp`). `arg_type` parses the flag's text
    when the field's type cannot (the namespace keeps what it returns) and `convert` turns
    that into the field's value (e.g. `--rank hostname` -> an int, in `from_args`). `min`
    and `max` bound the value (inclusive), checked whenever a config is built."""
    metadata = {"help": help, "flag": flag, "short": short, "metavar": metavar, "cli": cli,
                "choices": tuple(choices) if choices is not None else None,
                "arg_type": arg_type, "convert": convert, "min": min, "max": max}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Base of every settings group: a value outside its setting's [min, max] or choices is
    refused when the config is built (from flags or in code), naming the flag."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None or not meta:
                continue
            lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
            name = _flag(f) if meta.get("cli") else f.name
            if choices is not None and value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, "
                                 f"got {value!r}")
            if isinstance(value, bool) or (lo is None and hi is None):
                continue
            if not isinstance(value, (int, float)) or value != value \
                    or (lo is not None and value < lo) or (hi is not None and value > hi):
                bounds = f"[{_show(lo) if lo is not None else '-inf'}, " \
                         f"{_show(hi) if hi is not None else 'inf'}]"
                raise ValueError(f"{name} must be in {bounds}, got {value!r}")


def _base_type(hint: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of a field's annotation."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return hint, False


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(",") if part)


def _cli_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]


def _flag(f: dataclasses.Field) -> str:
    if f.metadata["flag"]:
        return f.metadata["flag"]
    if f.default is True:
        return "--no-" + f.name.removeprefix("enable_").replace("_", "-")
    return "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                  skip: Iterable[str] = ()) -> None:
    """Declare a flag for every setting of config class `cls` (but those in `skip`)."""
    skip = set(skip)
    for f, hint in _cli_fields(cls):
        if f.name in skip:
            continue
        meta, names = f.metadata, [_flag(f)] + ([f.metadata["short"]] if f.metadata["short"] else [])
        typ, _ = _base_type(hint)
        required = f.default is dataclasses.MISSING
        help_text = meta["help"] + ("" if required or f.default in (None, False, True)
                                    else f" (default: {_show(f.default)})")
        if typ is bool:
            parser.add_argument(*names, dest=f.name, help=help_text, default=f.default,
                                action="store_false" if f.default else "store_true")
            continue
        arg_type = meta["arg_type"] or (_comma_list if typing.get_origin(typ) is tuple else typ)
        parser.add_argument(*names, dest=f.name, type=arg_type, help=help_text,
                            choices=meta["choices"],
                            metavar=meta["metavar"] or {int: "N", float: "X"}.get(typ),
                            required=required, **({} if required else {"default": f.default}))


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """The config `cls` from parsed flags (every field `add_arguments` declared), plus
    `overrides` for fields set by code."""
    values = {}
    for f, _ in _cli_fields(cls):
        if hasattr(args, f.name) and f.name not in overrides:
            value = getattr(args, f.name)
            convert = f.metadata["convert"]
            values[f.name] = convert(value) if convert is not None else value
    return cls(**{**values, **overrides})


def declared_by(cls: type, name: str) -> type | None:
    """The class (a settings group, or `cls` itself) that declares field `name`."""
    return next((k for k in cls.__mro__ if name in k.__dict__.get("__annotations__", {})), None)


def shared(source: Any, cls: type, name: str) -> bool:
    """Whether `source` (a config) has the very setting `name` of `cls`: declared by the same
    group, not merely a namesake (serve's --host is the gateway's, not a worker's)."""
    return declared_by(cls, name) is declared_by(type(source), name) is not None


def to_argv(config: Any, cls: type, skip: Iterable[str] = ()) -> list[str]:
    """The flags that give a child process of config class `cls` the values of the settings
    `config` shares with it (see `shared`) that differ from `cls`'s defaults (typed values
    written as text once, here)."""
    skip, argv = set(skip), []
    for f, hint in _cli_fields(cls):
        if f.name in skip or not shared(config, cls, f.name):
            continue
        value = getattr(config, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if value is None:
            continue
        typ, _ = _base_type(hint)
        if typ is bool:
            argv.append(_flag(f))   # differs from the default: the switch flips it
        elif isinstance(value, tuple):
            argv += [_flag(f), ",".join(value)]
        else:
            argv += [_flag(f), repr(value) if isinstance(value, float) else str(value)]
    return argv


def pick(cls: type[T], source: Any, **overrides: Any) -> T:
    """A `cls` config with the values of the settings it shares with `source` (another
    config, see `shared`), plus `overrides`: how a component gets the sub-config it needs."""
    values = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls)
              if shared(source, cls, f.name)}
    return cls(**{**values, **overrides})
