"""structlog set-up: the journal's native protocol under systemd, JSON lines for files and
pipes, readable lines on a terminal.

Under systemd, stderr lines reach the journal as one MESSAGE with the unit's default
priority. Sent natively instead, each event becomes an entry with a PRIORITY that
`journalctl -p err` filters on and one field per key (`journalctl REQUEST=r1`).

Libraries log through the standard `logging` module (aiohttp's "Error handling request",
asyncio's "Exception in callback"), and Python prints warnings and uncaught exceptions
itself: setup() sends all of them through the same processors and renderer, one event
each, so nothing reaches stderr as plain lines (a traceback among JSON lines, or one
journal entry per traceback line without a PRIORITY).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "llm-residentd"
SEND_TIMEOUT = 1.0  # a journald that takes longer gets the line on stderr instead
# syslog(3) levels of structlog's level names.
PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4,
              "info": 6, "debug": 7}
# Fields the journal gives a meaning of its own (systemd.journal-fields(7)): an event key
# of that name becomes LLM_<NAME> (request_accepted's priority is LLM_PRIORITY).
JOURNAL_FIELDS = frozenset({
    "MESSAGE", "MESSAGE_ID", "PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC", "ERRNO",
    "INVOCATION_ID", "USER_INVOCATION_ID", "SYSLOG_FACILITY", "SYSLOG_IDENTIFIER",
    "SYSLOG_PID", "SYSLOG_TIMESTAMP", "SYSLOG_RAW", "DOCUMENTATION", "TID", "UNIT",
    "USER_UNIT", "OBJECT_PID", "COREDUMP_UNIT", "COREDUMP_USER_UNIT"})
NOT_FIELDS = ("level", "timestamp")  # PRIORITY says the one; the journal stamps each entry
# Request outcomes by the level they are logged at: completed and cancelled are info, what
# a client or its deadline caused is a warning, and any other code is the daemon's own
# failure (worker_died, internal, model_unavailable, ...): an error.
INFO_OUTCOMES = frozenset({"completed", "cancelled"})
WARNING_OUTCOMES = frozenset({"timeout", "deferred_timeout", "too_long", "bad_request",
                              "shutting_down"})


def outcome_level(outcome: str) -> str:
    """The log level of a request_finished event with this outcome (an error code)."""
    if outcome in INFO_OUTCOMES:
        return "info"
    return "warning" if outcome in WARNING_OUTCOMES else "error"


def request_finished(request: str, outcome: str, details: dict[str, Any]) -> None:
    """Log request_finished at its outcome's level; a failure carries its code (CODE in
    the journal), so `journalctl -p err` shows the requests the daemon failed."""
    code = {} if outcome == "completed" else {"code": outcome}
    getattr(structlog.get_logger(), outcome_level(outcome))(
        "request_finished", request=request, outcome=outcome, **code, **details)


def stderr_is_journal(env: Mapping[str, str] | None = None) -> bool:
    """Whether stderr is the journal stream systemd connected ($JOURNAL_STREAM names its
    device and inode, as sd_journal_stream_fd(3) says; a child whose stderr was
    redirected inherits the variable, so it must match)."""
    dev, _, ino = (os.environ if env is None else env).get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def field_name(key: str) -> str:
    """A journal field name for an event key: upper case, [A-Z0-9_], not starting with
    '_' or a digit, at most 64 characters, and none the journal defines itself."""
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_")
    if not name or name[0].isdigit() or name in JOURNAL_FIELDS:
        name = f"LLM_{name}"
    return name[:64]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def message(event_dict: Mapping[str, Any]) -> str:
    """MESSAGE: the event, then key=value (values with spaces quoted), a traceback last."""
    parts = [str(event_dict.get("event", ""))]
    for key, value in event_dict.items():
        if key in ("event", "exception", *NOT_FIELDS):
            continue
        text = _text(value)
        if not text or any(c in text for c in ' ="\n'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    line = " ".join(parts)
    if event_dict.get("exception"):
        line += "\n" + str(event_dict["exception"])
    return line


def encode_entry(fields: list[tuple[str, str]]) -> bytes:
    """One datagram of the journal's native protocol: NAME=value lines, and for a value
    holding a newline, NAME, newline, its length as 64-bit little endian, the bytes and a
    newline (systemd's "Native Journal Protocol")."""
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "backslashreplace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def entry(event_dict: Mapping[str, Any]) -> bytes:
    """The datagram for one structlog event."""
    level = str(event_dict.get("level", "info"))
    fields = [("MESSAGE", message(event_dict)),
              ("PRIORITY", str(PRIORITIES.get(level, 6))),
              ("SYSLOG_IDENTIFIER", IDENTIFIER)]
    fields += [(field_name(k), _text(v)) for k, v in event_dict.items() if k not in NOT_FIELDS]
    return encode_entry(fields)


class JournalRenderer:
    """The last processor: sends the event to journald and drops it, or, when the send
    fails (no journald, an entry too large for a datagram), renders it as a JSON line
    for stderr."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or JOURNAL_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # close-on-exec
        self.sock.settimeout(SEND_TIMEOUT)
        self.fallback = structlog.processors.JSONRenderer()

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        try:
            self.sock.sendto(entry(event_dict), self.path)
        except OSError:
            return self.fallback(logger, method_name, event_dict)
        raise structlog.DropEvent


# The logging module's levels as structlog's method names; a level between two (a library's
# own 25) takes the one below it.
STDLIB_LEVELS = ((logging.CRITICAL, "critical"), (logging.ERROR, "error"),
                 (logging.WARNING, "warning"), (logging.INFO, "info"))


def stdlib_level(levelno: int) -> str:
    return next((name for number, name in STDLIB_LEVELS if levelno >= number), "debug")


class Forward(logging.Handler):
    """The logging module's records, as events of the daemon's own pipeline: the message
    is the event, `logger` the logger's name, and a traceback the one `exception` field
    (format_exc_info), at the record's level."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[0] is not None:
                fields["exc_info"] = record.exc_info
            elif record.exc_text:
                fields["exception"] = record.exc_text
            if record.stack_info:
                fields["stack"] = record.stack_info
            log = structlog.get_logger()
            getattr(log, stdlib_level(record.levelno))(record.getMessage().rstrip(), **fields)
        except Exception:
            self.handleError(record)


def _uncaught(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    """sys.excepthook: the exception that ends the process, as one critical event."""
    structlog.get_logger().critical("uncaught_exception", exc_info=(exc_type, exc, tb))


def _thread_died(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: a thread's uncaught exception (SystemExit ends it quietly)."""
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    structlog.get_logger().error(
        "thread_exception", thread=args.thread.name if args.thread else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _unraisable(u: Any) -> None:
    """sys.unraisablehook: an exception Python can only report ("Exception ignored in",
    e.g. from a __del__)."""
    what = u.err_msg or "Exception ignored in"
    structlog.get_logger().error(
        "unraisable_exception", error=f"{what}: {u.object!r}" if u.object is not None else what,
        exc_info=(u.exc_type, u.exc_value, u.exc_traceback) if u.exc_value else None)


def capture_stdlib(level: str) -> None:
    """Route the logging module (its root logger at the daemon's level, with Forward as
    its only handler), warnings, and uncaught exceptions of the process, its threads and
    finalizers into structlog."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(Forward())
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    sys.excepthook = _uncaught
    threading.excepthook = _thread_died
    sys.unraisablehook = _unraisable


def setup(level: str = "info", fmt: str = "auto") -> None:
    """fmt auto: journal when stderr is the journal stream, console on a terminal, else
    json. The logging module, warnings and uncaught exceptions go the same way
    (capture_stdlib)."""
    if fmt == "auto":
        fmt = ("journal" if stderr_is_journal()
               else "console" if sys.stderr.isatty() else "json")
    renderer = {"journal": JournalRenderer, "console": structlog.dev.ConsoleRenderer,
                "json": structlog.processors.JSONRenderer}[fmt]()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    capture_stdlib(level)
