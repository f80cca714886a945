"""Ops of the control socket: one module each, registered by name.

An op declares its parameters once (type, bounds, help); `validate` checks a request
against them and `dispatch` runs the op. Its docstring is its spec in docs/protocol.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ...wire.protocol import ProtocolError

if TYPE_CHECKING:
    from ...core.requests import Request
    from ...core.service import Service

_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
          dict: "a map", list: "an array"}
_WIRE_TYPES = {type(None): "nil", bytes: "binary", list: "array", dict: "map", str: "string",
               int: "integer", float: "number", bool: "boolean"}


@dataclass(frozen=True)
class Param:
    kind: type
    help: str
    required: bool = False
    min: float | None = None  # strings: the shortest length; arrays: the fewest items
    max: float | None = None  # strings: the longest length; arrays: the most items
    items: Param | None = None  # arrays: what each item must be
    # What a type and bounds cannot say (which roles a message may have, a map that must be
    # JSON): raises ValueError naming the problem. The same hook as policies.base.Param.valid.
    valid: Callable[[Any], object] | None = None

    def check(self, name: str, value: Any) -> Any:
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or (self.kind is not bool and isinstance(value, bool)):
            got = _WIRE_TYPES.get(type(value), type(value).__name__)
            raise ProtocolError("bad_request", f"{name} must be {_NAMES[self.kind]}, not {got}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError("bad_request", f"{name} must be a finite number")
        if isinstance(value, dict):
            # keys become names (policy parameters): a binary or numeric key is a shape error
            for key in value:
                if not isinstance(key, str):
                    got = _WIRE_TYPES.get(type(key), type(key).__name__)
                    raise ProtocolError("bad_request", f"the keys of {name} must be strings, "
                                        f"not {got} ({key!r})")
        else:
            self._bounds(name, value)
        if self.items is not None:
            value = [self.items.check(f"{name}[{i}]", item) for i, item in enumerate(value)]
        if self.valid is not None:
            try:
                self.valid(value)
            except ValueError as exc:
                raise ProtocolError("bad_request", f"{name}: {exc}") from None
        return value

    def _bounds(self, name: str, value: Any) -> None:
        size = len(value) if isinstance(value, str | list) else value
        what = ("the length of " if isinstance(value, str) else
                "the number of items in " if isinstance(value, list) else "")
        if self.min is not None and size < self.min:
            raise ProtocolError("bad_request", f"{what}{name} must be at least {self.min}")
        if self.max is not None and size > self.max:
            raise ProtocolError("bad_request", f"{what}{name} must be at most {self.max}")


@dataclass
class Context:
    """What an op may use: the service, the peer's credentials, and its connection."""

    service: Service
    uid: int
    gid: int
    pid: int
    send: Callable[[dict[str, Any]], None]  # a frame on this connection, tagged with the id
    track: Callable[[Request], None]  # ties a request's lifetime to this connection


class Op:
    name: ClassVar[str]
    params: ClassVar[dict[str, Param]] = {}

    def execute(self, ctx: Context, args: dict[str, Any]) -> Any:
        """Run the op; return the reply's fields (or an awaitable of them), or None if it
        sent its reply itself."""
        raise NotImplementedError


OPS: dict[str, Op] = {}


def register(cls: type[Op]) -> type[Op]:
    assert cls.name not in OPS, cls.name
    OPS[cls.name] = cls()
    return cls


def validate(op: Op, msg: dict[str, Any]) -> dict[str, Any]:
    """The request's arguments, checked against the op's declared params."""
    args = {k: v for k, v in msg.items() if k not in ("id", "op")}
    for key in args:
        if key not in op.params:
            known = ", ".join(sorted(op.params)) or "none"
            raise ProtocolError("bad_request", f"op {op.name} has no field {key!r} (fields: {known})",
                                param=key)
    for key, param in op.params.items():
        if key in args:
            try:
                args[key] = param.check(key, args[key])
            except ProtocolError as exc:
                raise ProtocolError(exc.code, exc.message, param=key) from None
        elif param.required:
            raise ProtocolError("bad_request", f"op {op.name} needs field {key!r}: {param.help}",
                                param=key)
    return args


def lookup(name: Any) -> Op:
    if not isinstance(name, str):
        raise ProtocolError("bad_request", "field 'op' must be a string naming the op")
    op = OPS.get(name)
    if op is None:
        raise ProtocolError("unknown_op", f"no op {name!r} (ops: {', '.join(sorted(OPS))})")
    return op


from . import (  # noqa: E402,F401
    add_model,
    cancel,
    events,
    hello,
    limits,
    load,
    models,
    policy,
    ps,
    remove_model,
    status,
    submit,
    unload,
)
