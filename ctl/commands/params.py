"""Command-line options from an op's Param declarations, and the values they take: the
CLI offers what the daemon takes, checked as the daemon checks it where a usage error
serves better than the daemon's bad_request."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_residentd.front.ops import Op, Param, check_field
from llm_residentd.wire.protocol import ProtocolError


def param_type(name: str, param: Param) -> Any:
    """argparse type: the text as the Param's kind, within its bounds (else exit 2)."""
    def convert(text: str) -> Any:
        try:
            return check_field(param, name, param.kind(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {param.kind.__name__}") from None
        except ProtocolError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None
    convert.__name__ = param.kind.__name__  # argparse names the type in its messages
    return convert


def bounds(param: Param) -> str:
    if param.kind is str or param.min is None or param.max is None:
        return ""
    return f"{param.kind(param.min)}..{param.kind(param.max)}"  # 2147483647, not 2.14748e+09


def file_type(name: str, param: Param, as_json: bool) -> Any:
    """argparse type: a file's text (or its JSON), checked as the Param (else exit 2)."""
    def convert(path: str) -> Any:
        if path == "-":  # the prompt may be on stdin already
            raise argparse.ArgumentTypeError("give a file, not - (stdin)")
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f) if as_json else f.read()
            return check_field(param, name, value)
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"{path}: {exc.strerror}") from None
        except ValueError as exc:  # JSON or UTF-8
            raise argparse.ArgumentTypeError(f"{path}: not JSON: {exc}") from None
        except ProtocolError as exc:
            raise argparse.ArgumentTypeError(f"{path}: {exc.message}") from None
    convert.__name__ = "file"
    return convert


class Append(argparse.Action):
    """A repeatable option gathering an array field, at most param.max items."""

    def __init__(self, *args: Any, param: Param, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.param = param

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        items = [*(getattr(namespace, self.dest) or []), values]
        if self.param.max is not None and len(items) > self.param.max:
            raise argparse.ArgumentError(self, f"at most {self.param.max:g} times")
        setattr(namespace, self.dest, items)


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: write settings as key=value")
    return key, value


@dataclass(frozen=True)
class Flag:
    """How an op field shows as an option, besides its Param: the words for a person at
    a terminal."""

    metavar: str | None = None
    help: str | None = None  # default: the Param's help
    checked: bool = False  # the Param checks the value here (else the daemon does)
    default: Any = None


def op_arguments(op: type[Op], flags: dict[str, Flag], positional: tuple[str, ...] = ()
                 ) -> Callable[[argparse.ArgumentParser], None]:
    """A command's arguments from the op it sends: its positional fields (MODEL), then an
    option --NAME for each other field. Every field needs its Flag, so that a new one
    cannot be missed."""
    def arguments(parser: argparse.ArgumentParser) -> None:
        for name in positional:
            parser.add_argument(name, metavar=name.upper())
        for name, param in op.params.items():
            if name not in positional:
                _add_option(parser, name, param, flags[name])
    return arguments


def _add_option(parser: argparse.ArgumentParser, name: str, param: Param, flag: Flag) -> None:
    help_ = (param.help if flag.help is None else flag.help).replace("%", "%%")
    option = f"--{name.replace('_', '-')}"
    if param.kind is bool:
        parser.add_argument(option, action="store_true", help=help_)
    else:
        kind = param_type(name, param) if flag.checked else param.kind
        parser.add_argument(option, type=kind, metavar=flag.metavar, help=help_,
                            default=flag.default)


def op_fields(args: argparse.Namespace, op: type[Op]) -> dict[str, Any]:
    """The op's fields that the command line gave (an option left out is no field)."""
    return {name: getattr(args, name) for name in op.params if getattr(args, name) is not None}
