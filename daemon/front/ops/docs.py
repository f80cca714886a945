"""Rewrite the generated blocks of docs/protocol.md from the ops and the error codes.

    python -m llm_residentd.front.ops.docs [PATH]          # rewrite PATH (default: the repo's page)
    python -m llm_residentd.front.ops.docs --check [PATH]  # exit 1 if PATH is stale

Only the text between `<!-- generated: NAME ... -->` and `<!-- end generated -->` is
replaced; the prose around it is kept. The blocks are:

- `ops`: each op, the first line of its module docstring, and its `Access:` line;
- `fields OP`: the request fields of OP, from its `Param` declarations (one per op);
- `error-codes`: daemon/wire/protocol.py ERROR_CODES, in declaration order;
- `hello-reply`: the worked example's hello reply, produced by the hello op itself;
- `stream-events`: the events a submit streams to its client, from daemon/wire/events.py;
- `worker-messages`: every message between the daemon and a worker, from
  daemon/wire/messages.py (tag, docstring, fields with their types, defaults and comments).

A page without a block for some op, or with a block this module does not know, is an
error: a new op cannot be left out of the page.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import structlog
import structlog.testing

from ...catalog.config import DaemonConfig
from ...wire import events, messages
from ...wire.protocol import ERROR_CODES, encode
from .base import OPS, Context, Op, Param

PAGE = Path(__file__).resolve().parents[3] / "docs" / "protocol.md"
COMMAND = "python -m llm_residentd.front.ops.docs"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z0-9 _-]+?) \(.*?\) -->\n)(?P<body>.*?)"
                   r"(<!-- end generated -->)", re.DOTALL)
_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "map",
          list: "array"}
_PLURALS = {str: "strings", int: "integers", float: "numbers", bool: "booleans", dict: "maps"}
HELLO_REQUEST = {"id": 1, "op": "hello", "protocol": 1, "client": "doc/1"}


class StaleMarkers(Exception):
    """The page's generated blocks do not match the ops (missing or unknown blocks)."""


def _doc(op: Op) -> str:
    return (importlib.import_module(type(op).__module__).__doc__ or "").strip()


def summary(op: Op) -> str:
    """The op's one-line description: its docstring's title without the "name: " prefix."""
    title = _doc(op).partition("\n")[0].split(": ", 1)[-1].rstrip(".")
    return title[:1].upper() + title[1:]


def access(op: Op) -> str:
    """Who may use the op: its docstring's `Access:` paragraph, joined into one line."""
    match = re.search(r"^Access: (.+?)(?:\n\s*\n|\Z)", _doc(op), re.MULTILINE | re.DOTALL)
    if match is None:
        raise StaleMarkers(f"op {op.name}: its module docstring has no 'Access:' line")
    return " ".join(match[1].split()).rstrip(".")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def type_name(p: Param) -> str:
    return f"array of {_PLURALS[p.items.kind]}" if p.items is not None else _TYPES[p.kind]


def bounds(p: Param) -> str:
    """Param bounds in words; for strings they count characters, for arrays items (and
    then what each item may be)."""
    lo, hi = p.min, p.max
    if p.kind is list:
        unit = "items" if (hi if hi is not None else lo) != 1 else "item"
        count = ("" if lo is None and hi is None else f"at most {_num(hi)} {unit}"
                 if lo is None else f"at least {_num(lo)} {unit}" if hi is None
                 else f"{_num(lo)} to {_num(hi)} {unit}")
        each = bounds(p.items) if p.items is not None else ""
        return "; ".join(x for x in (count, f"each {each}" if each else "") if x)
    if p.kind is str:
        if lo is None and hi is None:
            return ""
        unit = "characters" if (hi if hi is not None else lo) != 1 else "character"
        if lo is None:
            return f"at most {_num(hi)} {unit}"
        return f"at least {_num(lo)} {unit}" if hi is None else f"{_num(lo)} to {_num(hi)} {unit}"
    if lo is None and hi is None:
        return ""
    if lo is None:
        return f"at most {_num(hi)}"
    return f"at least {_num(lo)}" if hi is None else f"{_num(lo)} to {_num(hi)}"


def fields_table(op: Op) -> str:
    if not op.params:
        return "No fields: any field is `bad_request`.\n"
    rows = ["| field | type | required | bounds | meaning |", "|---|---|---|---|---|"]
    for name, p in op.params.items():
        rows.append(f"| `{name}` | {type_name(p)} | {'yes' if p.required else 'no'} | "
                    f"{bounds(p)} | {p.help} |")
    return "\n".join(rows) + "\n"


def ops_table() -> str:
    rows = ["| op | what it does | who may use it |", "|---|---|---|"]
    for name in sorted(OPS):
        rows.append(f"| `{name}` | {summary(OPS[name])} | {access(OPS[name])} |")
    return "\n".join(rows) + "\n"


def error_codes_table() -> str:
    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| `{code}` | {meaning} |" for code, meaning in ERROR_CODES.items()]
    return "\n".join(rows) + "\n"


def _hex(frame: bytes) -> str:
    lines = [" ".join(f"{b:02x}" for b in frame[:4])]
    body = frame[4:]
    lines += [" ".join(f"{b:02x}" for b in body[i:i + 16]) for i in range(0, len(body), 16)]
    return "\n".join(lines)


def hello_reply() -> dict[str, Any]:
    """What the hello op answers HELLO_REQUEST for uid 0 with the default max_frame."""
    service = SimpleNamespace(config=SimpleNamespace(daemon=DaemonConfig()))
    ctx = Context(service=service, uid=0, gid=0, pid=1, send=lambda m: None,  # type: ignore[arg-type]
                  track=lambda r: None)
    args = {k: v for k, v in HELLO_REQUEST.items() if k not in ("id", "op")}
    with structlog.testing.capture_logs():  # its debug line is not part of the page
        reply = OPS["hello"].execute(ctx, args)
    return {"id": HELLO_REQUEST["id"], "ok": True, **reply}


def hello_example() -> str:
    reply = hello_reply()
    frame = encode(reply)
    return (f"Server → reply ({len(frame) - 4}-byte body; header, then the body):\n\n"
            f"```\n{_hex(frame)}\n```\n```json\n{json.dumps(reply)}\n```\n")


def _comments(cls: type) -> dict[str, str]:
    """The `# ...` comment after each field of a message class, by field name."""
    found = re.finditer(r"^\s+(\w+): [^#\n]*#\s*(.+)$", inspect.getsource(cls), re.MULTILINE)
    return {m[1]: m[2] for m in found}


def _default(f: msgspec.structs.FieldInfo) -> str:
    if f.required:
        return "required"
    value = f.default_factory() if f.default is msgspec.NODEFAULT else f.default
    return f"`{json.dumps(value) if not isinstance(value, bytes) else repr(value)}`"


def message_table(cls: type[msgspec.Struct], within: str = "a message") -> str:
    """One message: its tag (or, for a nested struct, its name), docstring and fields."""
    tag = cls.__struct_config__.tag
    title = f"`{tag}`" if tag else f"{cls.__name__} (inside {within})"
    doc = " ".join((cls.__doc__ or "").split())
    rows = [f"#### {title}", "", *([doc, ""] if doc else []),
            "| field | type | default | meaning |", "|---|---|---|---|"]
    notes = _comments(cls)
    for f in msgspec.structs.fields(cls):
        kind = cls.__annotations__[f.name].replace("|", "\\|")  # as written in messages.py
        rows.append(f"| `{f.name}` | `{kind}` | {_default(f)} | {notes.get(f.name, '')} |")
    return "\n".join(rows) + "\n"


def worker_messages() -> str:
    """daemon/wire/messages.py as tables: daemon -> worker, worker -> daemon, nested structs."""
    parts = []
    for heading, union in (("Daemon → worker", messages.ToWorker),
                           ("Worker → daemon", messages.FromWorker)):
        parts.append(f"### {heading}\n")
        parts += [message_table(cls) for cls in typing.get_args(union)]
    parts.append("### Structures inside messages\n")
    parts += [message_table(cls) for cls in (messages.RequestParams, messages.Resume,
                                              messages.Stats)]
    return "\n".join(parts)


def stream_events() -> str:
    """daemon/wire/events.py as tables: which events end a request, each event's fields,
    then the structure inside an error."""
    kinds = typing.get_args(events.Event)
    summary = ["| event | ends the request's stream |", "|---|---|", *(
        f"| `{cls.__struct_config__.tag}` | {'yes' if cls.terminal else 'no'} |"
        for cls in kinds)]
    parts = ["\n".join(summary) + "\n", *(message_table(cls) for cls in kinds)]
    parts.append(message_table(events.Failure, "an event"))
    return "\n".join(parts)


def blocks() -> dict[str, str]:
    """Every block the page must hold, by name."""
    out = {"ops": ops_table(), "error-codes": error_codes_table(), "hello-reply": hello_example(),
           "stream-events": stream_events(), "worker-messages": worker_messages()}
    out.update({f"fields {name}": fields_table(op) for name, op in sorted(OPS.items())})
    return out


def rewrite(text: str) -> str:
    """The page with every generated block rendered afresh and the prose untouched."""
    want = blocks()
    found = [m["name"] for m in BLOCK.finditer(text)]
    unknown = sorted(set(found) - set(want))
    missing = sorted(set(want) - set(found))
    twice = sorted({n for n in found if found.count(n) > 1})
    if unknown or missing or twice:
        raise StaleMarkers(
            f"docs/protocol.md: blocks unknown {unknown}, missing {missing}, repeated {twice}; "
            f"a block is <!-- generated: NAME ({COMMAND}) --> ... <!-- end generated -->")
    return BLOCK.sub(lambda m: m[1] + want[m["name"]] + m[4], text)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [a for a in argv if a != "--check"]
    path = Path(paths[0]) if paths else PAGE
    text = path.read_text()
    try:
        new = rewrite(text)
    except StaleMarkers as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    if check:
        if new != text:
            print(f"{path} is stale: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new)
        print(f"{path}: rewrote the generated blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
