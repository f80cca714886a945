"""What every op is: its declared fields (Param), the context it runs in, the registry by
name, and the checks a request passes before an op runs (validate, lookup)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ...wire.protocol import ProtocolError
from ...wire.schema import Param, Problem, SchemaError, Shown

if TYPE_CHECKING:
    from ...core.requests import Request
    from ...core.service import Service

_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
          dict: "a map", list: "an array"}
_WIRE_TYPES = {type(None): "nil", bytes: "binary", list: "array", dict: "map", str: "string",
               int: "integer", float: "number", bool: "boolean"}


def _wire_type(value: Any) -> str:
    return _WIRE_TYPES.get(type(value), type(value).__name__)


# The protocol's wording: msgpack's type names, and what a bound of a string or an array counts
_WORDING: Mapping[Problem, str] = {
    "kind": "{name} must be {kind}, not {got}",
    "finite": "{name} must be a finite number",
    "range": "{name} must fit in a 64-bit integer, not {value}",
    "text": "{name}: {detail}",
    "key": "the keys of {name} must be strings, not {got} ({value!r})",
    "min": "{counted}{name} must be at least {limit}",
    "max": "{counted}{name} must be at most {limit}",
    "valid": "{name}: {detail}",
}


def _counted(value: Any) -> str:
    return ("the length of " if isinstance(value, str) else
            "the number of items in " if isinstance(value, list) else "")


def check_field(param: Param, name: str, value: Any) -> Any:
    """The field's value checked against its Param (llmctl checks its options with this
    too); ProtocolError bad_request says what is wrong."""
    try:
        return param.check(name, value)
    except SchemaError as exc:
        raise ProtocolError("bad_request", exc.words(
            _WORDING, kind=_NAMES[exc.param.kind], got=_wire_type(exc.value),
            counted=_counted(exc.value)), param=name) from None


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
            raise ProtocolError("bad_request", f"op {op.name} has no field {Shown(key)!r} (fields: {known})",
                                param=key)
    for key, param in op.params.items():
        if key in args:
            args[key] = check_field(param, key, args[key])
        elif param.required:
            raise ProtocolError("bad_request", f"op {op.name} needs field {key!r}: {param.help}",
                                param=key)
    return args


def lookup(name: Any) -> Op:
    if not isinstance(name, str):
        raise ProtocolError("bad_request", "field 'op' must be a string naming the op")
    op = OPS.get(name)
    if op is None:
        raise ProtocolError("unknown_op", f"no op {Shown(name)!r} (ops: {', '.join(sorted(OPS))})")
    return op
