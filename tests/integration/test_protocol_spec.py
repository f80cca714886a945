"""Claims of docs/protocol.md that a client sees on the wire, checked on a real daemon."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import msgpack
import pytest
from llm_residentd.wire.protocol import encode, recv_frame, send_frame

DOC = Path(__file__).parents[2] / "docs" / "protocol.md"


def _pack_pairs(pairs: list[tuple[str, object]]) -> bytes:
    """A msgpack map holding these key/value pairs in order, repeats included."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(
        msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)


@pytest.mark.parametrize("sent", [b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x05\x81"],
                         ids=["1-of-4-header-bytes", "3-of-4-header-bytes", "inside-the-body"])
def test_half_close_inside_a_frame_gets_bad_frame(tiny_daemon, sent):
    """protocol.md section 2: a half-closed client still reads the bad_frame, then EOF."""
    sock = tiny_daemon.raw()
    sock.sendall(sent)
    sock.shutdown(socket.SHUT_WR)
    reply = recv_frame(sock)
    assert reply == {"id": None, "ok": False, "error": {
        "code": "bad_frame", "message": "stream ended inside a frame"}}
    assert recv_frame(sock) is None
    assert ('| end of stream inside a frame: after 1 to 3 bytes of a header, or inside a body '
            '| `bad_frame` "stream ended inside a frame"') in DOC.read_text()


def test_half_close_at_a_frame_boundary_gets_nothing(tiny_daemon):
    sock = tiny_daemon.raw()
    sock.shutdown(socket.SHUT_WR)
    assert recv_frame(sock) is None


def test_a_repeated_hello(tiny_daemon):
    """protocol.md section 4: the right version succeeds again; another one closes."""
    sock = tiny_daemon.raw()  # greeted once
    send_frame(sock, {"id": 1, "op": "hello", "protocol": 1})
    assert recv_frame(sock)["ok"] is True
    send_frame(sock, {"id": 2, "op": "hello", "protocol": 2})
    reply = recv_frame(sock)
    assert reply["id"] == 2 and reply["error"]["code"] == "unsupported_protocol"
    assert recv_frame(sock) is None
    assert "with\n`protocol` 1 it succeeds again" in DOC.read_text()


def test_a_repeated_key_takes_its_last_value(tiny_daemon):
    """protocol.md section 2: a map that holds a key twice counts the last value."""
    sock = tiny_daemon.raw(hello=False)
    body = _pack_pairs([("id", 1), ("op", "hello"), ("protocol", 2), ("protocol", 1)])
    sock.sendall(struct.pack(">I", len(body)) + body)
    assert recv_frame(sock)["ok"] is True  # protocol 2 would have closed the connection
    body = _pack_pairs([("id", 2), ("op", "status"), ("id", 3), ("op", "models")])
    sock.sendall(struct.pack(">I", len(body)) + body)
    reply = recv_frame(sock)
    assert reply["id"] == 3 and reply["ok"] is True and "models" in reply
    assert "the **last** value counts, at any depth" in DOC.read_text()


def test_a_bin_key_is_no_field_name(tiny_daemon):
    """protocol.md section 2: a bin key passes the decoder but names no field."""
    sock = tiny_daemon.raw()
    body = b"\x83" + b"".join(msgpack.packb(x, use_bin_type=True) for x in (
        "id", 1, "op", "status", b"verbose", True))
    sock.sendall(struct.pack(">I", len(body)) + body)
    reply = recv_frame(sock)
    assert reply["id"] == 1 and reply["error"]["code"] == "bad_request"
    assert "has no field b'verbose'" in reply["error"]["message"]


def _fields_of_table_after(doc: str, marker: str) -> set[str]:
    """The first column of the first table after the line that starts with marker."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(marker))
    out: set[str] = set()
    for line in lines[start + 1:]:
        if line.startswith("| `"):
            out.add(line.split("`")[1])
        elif out and not line.startswith("|"):
            break
    return out


def test_status_and_models_replies_match_section_10(tiny_daemon):
    """Every field the daemon sends is in section 10's tables, and every field there is sent."""
    doc = DOC.read_text()
    sock = tiny_daemon.raw()
    send_frame(sock, {"id": 1, "op": "status"})
    status = recv_frame(sock)
    send_frame(sock, {"id": 2, "op": "models"})
    models = recv_frame(sock)["models"]
    tables = {
        "status": (set(status) - {"id", "ok"}, {"daemon", "workers", "pressure", "cpu", "models"}),
        "daemon": (set(status["daemon"]), _fields_of_table_after(doc, "`daemon`:")),
        "workers": (set(status["workers"][0]), _fields_of_table_after(doc, "`workers`:")),
        "pressure": (set(status["pressure"]), _fields_of_table_after(doc, "`pressure`:")),
        "cpu": (set(status["cpu"]), _fields_of_table_after(doc, "`cpu`:")),
        "models (status)": (set(status["models"]["tiny"]),
                            _fields_of_table_after(doc, "`models`: a map")),
        "models (op)": (set(models[0]), _fields_of_table_after(doc, "One entry per configured")),
    }
    for name, (sent, documented) in tables.items():
        assert sent == documented, (name, "undocumented:", sent - documented,
                                    "documented but not sent:", documented - sent)


def test_a_hello_begun_before_the_hello_deadline_may_finish_after_it(tiny_daemon):
    """protocol.md section 4: the deadline (2 s here) bounds when a frame begins."""
    frame = encode({"id": 1, "op": "hello", "protocol": 1})
    sock = tiny_daemon.raw(hello=False)
    time.sleep(0.5)
    sock.sendall(frame[:2])
    time.sleep(2.5)  # past hello_timeout, within frame_timeout (10 s)
    sock.sendall(frame[2:])
    assert recv_frame(sock)["ok"] is True
