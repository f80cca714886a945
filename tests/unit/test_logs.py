"""Logs: the journal's native protocol (encoder, fields, priorities), when it is used, and
the level of each request outcome."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import socket
import struct
import sys
import threading
import warnings

import pytest
import structlog
from llm_residentd import logs


def parse(datagram: bytes) -> dict[str, list[bytes]]:
    """The journal's side of the native protocol, written from its description."""
    fields: dict[str, list[bytes]] = {}
    i = 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            i = nl + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", datagram[nl + 1:nl + 9])
            value = datagram[nl + 9:nl + 9 + size]
            assert datagram[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
        fields.setdefault(name.decode(), []).append(value)
    return fields


def test_the_encoding_round_trips_values_with_newlines_and_equals_signs():
    values = [("MESSAGE", "one line"), ("TRACE", "two\nlines\n"), ("EQ", "a=b=c"),
              ("EMPTY", ""), ("UNI", "h\u00e9llo \u2603"), ("NL", "\n")]
    assert {k: v[0].decode() for k, v in parse(logs.encode_entry(values)).items()} == dict(values)
    assert logs.encode_entry([("A", "x\ny")]) == b"A\n" + struct.pack("<Q", 3) + b"x\ny\n"


@pytest.mark.parametrize("level, priority", [("error", "3"), ("warning", "4"), ("info", "6"),
                                             ("debug", "7"), ("critical", "2")])
def test_levels_become_syslog_priorities(level, priority):
    fields = parse(logs.entry({"event": "x", "level": level}))
    assert fields["PRIORITY"] == [priority.encode()]


def test_an_event_becomes_a_readable_message_and_a_field_per_key():
    event = {"event": "request_finished", "level": "error", "timestamp": "2026-11-30T00:00:00Z",
             "request": "r7", "model": "tiny", "worker": "tiny-0", "code": "worker_died",
             "error": "worker tiny-0 (pid 12) killed by signal 9", "priority": 5,
             "tokens_per_s": 12.5, "peer-uid": 1000, "_hidden": True, "9lives": None,
             "exception": "Traceback (most recent call last):\n  boom\nValueError: x"}
    fields = {k: v[0].decode() for k, v in parse(logs.entry(event)).items()}
    assert fields["PRIORITY"] == "3" and fields["SYSLOG_IDENTIFIER"] == "llm-residentd"
    assert fields["MESSAGE"].startswith(
        'request_finished request=r7 model=tiny worker=tiny-0 code=worker_died '
        'error="worker tiny-0 (pid 12) killed by signal 9" priority=5 tokens_per_s=12.5')
    assert fields["MESSAGE"].endswith("\nTraceback (most recent call last):\n  boom\nValueError: x")
    assert (fields["REQUEST"], fields["MODEL"], fields["WORKER"], fields["CODE"]) == \
        ("r7", "tiny", "tiny-0", "worker_died")
    assert fields["EVENT"] == "request_finished" and fields["TOKENS_PER_S"] == "12.5"
    assert fields["LLM_PRIORITY"] == "5"  # PRIORITY is the journal's own
    assert fields["PEER_UID"] == "1000" and fields["HIDDEN"] == "true"
    assert fields["LLM_9LIVES"] == "null" and "ValueError" in fields["EXCEPTION"]
    assert "LEVEL" not in fields and "TIMESTAMP" not in fields
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", name) for name in fields)


def test_stderr_is_the_journal_only_when_journal_stream_names_it(monkeypatch, tmp_path):
    with open(tmp_path / "stderr", "w") as fake, open(tmp_path / "other", "w") as other:
        monkeypatch.setattr(sys, "stderr", fake)
        st, ost = os.fstat(fake.fileno()), os.fstat(other.fileno())
        assert logs.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        # A worker whose stderr is a pipe inherits the variable: not the journal.
        assert not logs.stderr_is_journal({"JOURNAL_STREAM": f"{ost.st_dev}:{ost.st_ino}"})
        assert not logs.stderr_is_journal({})
        assert not logs.stderr_is_journal({"JOURNAL_STREAM": "junk"})


@pytest.fixture
def journal(monkeypatch, tmp_path):
    """A datagram socket standing in for journald's."""
    path = tmp_path / "journal.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(path))
    yield sock
    sock.close()
    structlog.reset_defaults()


def test_auto_logs_natively_when_stderr_is_the_journal(monkeypatch, tmp_path, journal):
    fake = open(tmp_path / "stderr", "w")  # noqa: SIM115 (stands in for the stream)
    monkeypatch.setattr(sys, "stderr", fake)
    st = os.fstat(fake.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    logs.setup("info", "auto")
    structlog.get_logger().bind(worker="tiny-0").error("worker_exited", pid=12, how="killed")
    structlog.get_logger().debug("not_sent")  # below the level
    logs.request_finished("r1", "worker_died", {"model": "tiny", "error": "gone"})
    fields = parse(journal.recv(1 << 16))
    assert fields["MESSAGE"] == [b"worker_exited worker=tiny-0 pid=12 how=killed"]
    assert fields["PRIORITY"] == [b"3"] and fields["WORKER"] == [b"tiny-0"]
    fields = parse(journal.recv(1 << 16))
    assert fields["REQUEST"] == [b"r1"] and fields["CODE"] == [b"worker_died"]
    assert fields["PRIORITY"] == [b"3"] and fields["OUTCOME"] == [b"worker_died"]
    fake.close()
    assert (tmp_path / "stderr").read_text() == ""  # nothing went to stderr


def test_without_journald_the_line_goes_to_stderr_as_json(monkeypatch, tmp_path):
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(tmp_path / "absent.sock"))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.setup("info", "journal")
    try:
        structlog.get_logger().warning("psi_trigger_unavailable", key="system/cpu")
    finally:
        structlog.reset_defaults()
    line = json.loads(out.getvalue())
    assert line["event"] == "psi_trigger_unavailable" and line["level"] == "warning"


def test_elsewhere_json_lines_as_before(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.setup("info", "auto")
    try:
        logs.request_finished("r2", "completed", {"model": "tiny"})
    finally:
        structlog.reset_defaults()
    line = json.loads(out.getvalue())
    assert line["event"] == "request_finished" and line["level"] == "info" and "code" not in line


@pytest.mark.parametrize("outcome, level", [
    ("completed", "info"), ("cancelled", "info"), ("timeout", "warning"),
    ("deferred_timeout", "warning"), ("too_long", "warning"), ("shutting_down", "warning"),
    ("worker_died", "error"), ("internal", "error"), ("model_unavailable", "error"),
    ("a_code_added_later", "error"),  # a new failure is the daemon's until said otherwise
])
def test_request_outcomes_have_levels(outcome, level):
    assert logs.outcome_level(outcome) == level


# -- the logging module, warnings and uncaught exceptions (issue 21, item 5) ----------------

@pytest.fixture(autouse=True)
def stdlib():
    """Undo what setup() does to the logging module, warnings and the exception hooks
    (every test of this file: a capture left on would outlive its test)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook,
             sys.unraisablehook)
    yield
    root.handlers[:], level = saved[0], saved[1]
    root.setLevel(level)
    logging.captureWarnings(False)
    sys.excepthook, threading.excepthook, sys.unraisablehook = saved[2:]
    structlog.reset_defaults()


def library_records() -> None:
    """What libraries log: aiohttp's "Error handling request", asyncio's "Exception in
    callback" (from a real loop), a warning, a custom level, a debug line, and exceptions
    nobody caught in a thread, a finalizer and the main program."""
    try:
        raise ValueError("Invalid method encountered")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "peer")

    async def callback_fails() -> None:
        asyncio.get_running_loop().call_soon(lambda: 1 / 0)
        await asyncio.sleep(0.01)
    asyncio.run(callback_fails())
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("an old way", DeprecationWarning, stacklevel=1)
    logging.getLogger("lib").log(25, "between info and warning")
    logging.getLogger("aiohttp.access").debug("below the level")
    thread = threading.Thread(target=lambda: {}["missing"], name="psi-watcher")
    thread.start()
    thread.join()

    class Finalized:
        def __del__(self) -> None:
            raise OSError("closing failed")
    Finalized()
    try:
        raise SystemError("the end")
    except SystemError:
        sys.excepthook(*sys.exc_info())


# event, level, logger, the exception's last line
LIBRARY_EVENTS = [
    ("Error handling request from peer", "error", "aiohttp.server",
     "ValueError: Invalid method encountered"),
    ("Exception in callback", "error", "asyncio", "ZeroDivisionError: division by zero"),
    ("DeprecationWarning: an old way", "warning", "py.warnings", None),
    ("between info and warning", "info", "lib", None),
    ("thread_exception", "error", None, "KeyError: 'missing'"),
    ("unraisable_exception", "error", None, "OSError: closing failed"),
    ("uncaught_exception", "critical", None, "SystemError: the end"),
]


def test_library_records_are_json_lines_of_the_pipeline(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.setup("info", "json")
    assert logging.getLogger().level == logging.INFO
    library_records()
    lines = out.getvalue().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert len(events) == len(LIBRARY_EVENTS), lines
    for got, (event, level, logger, last) in zip(events, LIBRARY_EVENTS, strict=True):
        assert event in got["event"] and got["level"] == level, got
        assert got.get("logger") == logger and got["timestamp"], got
        if last is None:
            assert "exception" not in got, got
        else:  # the traceback is one field, not lines of its own
            assert got["exception"].startswith("Traceback (most recent call last):"), got
            assert got["exception"].splitlines()[-1] == last, got
    assert events[4]["thread"] == "psi-watcher"
    assert "__del__" in events[5]["error"]


def test_the_root_logger_follows_the_daemon_level(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logging.basicConfig()  # a library's handler set up before the daemon's is replaced
    logs.setup("warning", "json")
    assert [type(h) for h in logging.getLogger().handlers] == [logs.Forward]
    logging.getLogger("aiohttp.server").info("not shown")
    logging.getLogger("aiohttp.server").warning("shown")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["shown"]


@pytest.mark.parametrize("levelno, name", [
    (logging.CRITICAL, "critical"), (logging.ERROR, "error"), (logging.WARNING, "warning"),
    (logging.INFO, "info"), (logging.DEBUG, "debug"), (45, "error"), (5, "debug")])
def test_logging_levels_become_structlog_levels(levelno, name):
    assert logs.stdlib_level(levelno) == name


def test_in_journal_mode_each_library_record_is_one_entry_with_a_priority(
        monkeypatch, tmp_path, journal):
    fake = open(tmp_path / "stderr", "w")  # noqa: SIM115 (stands in for the stream)
    monkeypatch.setattr(sys, "stderr", fake)
    logs.setup("info", "journal")
    library_records()
    entries = [parse(journal.recv(1 << 16)) for _ in LIBRARY_EVENTS]
    journal.settimeout(0.2)
    with pytest.raises(TimeoutError):  # nothing more: one entry per record
        journal.recv(1 << 16)
    for fields, (event, level, logger, last) in zip(entries, LIBRARY_EVENTS, strict=True):
        fields = {k: v[0].decode() for k, v in fields.items()}
        assert fields["PRIORITY"] == str(logs.PRIORITIES[level]), fields
        assert fields["SYSLOG_IDENTIFIER"] == "llm-residentd" and event in fields["EVENT"]
        assert fields["MESSAGE"].startswith(fields["EVENT"].split("\n")[0])
        assert fields.get("LOGGER") == logger
        if last is not None:
            assert fields["EXCEPTION"].splitlines()[-1] == last
    fake.close()
    assert (tmp_path / "stderr").read_text() == ""  # nothing went to stderr
