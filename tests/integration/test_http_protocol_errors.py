"""Requests aiohttp cannot parse get OpenAI's JSON error shape, every refusal leaves a
rate-limited http_refused line, and a burst of malformed requests leaves a log of JSON
lines only: no traceback outside JSON, none at all (issue 21, items 5 and 6)."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import time

import pytest
from harness import tiny_config
from http_helpers import raw_unix

MAX_BODY = 262144
HEADERS = b"Host: localhost\r\nConnection: close\r\n"


def post(body: bytes, content_type: bytes = b"application/json", path: bytes = b"/v1/completions",
         method: bytes = b"POST") -> bytes:
    return (method + b" " + path + b" HTTP/1.1\r\n" + HEADERS + b"Content-Type: " + content_type
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


# Requests aiohttp's parser refuses before any handler runs.
UNPARSABLE = {
    "bad chunk size": b"POST /v1/completions HTTP/1.1\r\n" + HEADERS
    + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "Content-Length and Transfer-Encoding": b"POST /v1/completions HTTP/1.1\r\n" + HEADERS
    + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "a 100 kB header": b"GET /health HTTP/1.1\r\n" + HEADERS + b"X-Big: " + b"a" * 100_000
    + b"\r\n\r\n",
    "a bad request line": b"\x00\xff garbage \r\n\r\n",
}
# The same and more: what the handlers refuse (bad JSON, a form, nesting, sizes, paths).
DEEP = b"[" * 500 + b'"x"' + b"]" * 500
MALFORMED = {
    **UNPARSABLE,
    "bad JSON": post(b'{"model": "tiny", "prompt": '),
    "a form, not JSON": post(b"model=tiny&prompt=x", b"application/x-www-form-urlencoded"),
    "JSON nested too deeply to parse": post(b"[" * 100_000),
    "a prompt nested 500 deep": post(b'{"model": "tiny", "max_tokens": 1, "prompt": ' + DEEP + b"}"),
    "messages nested 500 deep": post(b'{"model": "tiny", "messages": ' + DEEP + b"}",
                                     path=b"/v1/chat/completions"),
    # Refused by its Content-Length; the body is not sent (a daemon that closes with bytes
    # unread in its socket may reset the connection before the reply is read).
    "a body over max_body": post(b"x" * (MAX_BODY + 1))[:-(MAX_BODY + 1)],
    "no such path": b"GET /v2/nothing HTTP/1.1\r\n" + HEADERS + b"\r\n",
    "a method not allowed": post(b"{}", path=b"/health", method=b"PUT"),
}


def exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send request whole (the daemon may close before reading it all) and read the reply
    to the end: status, headers (lower-case names), body."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(request)
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    sock.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k: v for k, v in headers.items()}, body


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_model_path):
    from harness import Daemon
    d = Daemon(tmp_path_factory.mktemp("httpproto"), tiny_config(
        tiny_model_path, daemon="max_connections_per_uid = 65536")
        + f"[http]\nmax_body = {MAX_BODY}\nheader_timeout = 2.0\n")
    d.start()
    yield d
    d.stop()


@pytest.mark.parametrize("what", list(UNPARSABLE))
def test_what_aiohttp_cannot_parse_gets_openais_json_shape(daemon, what):
    status, headers, body = exchange(raw_unix(daemon), UNPARSABLE[what])
    assert status == 400 and headers["content-type"].startswith("application/json"), body
    error = json.loads(body)["error"]
    message = error.pop("message")  # the parser's reason, without the bytes it quotes
    assert message.startswith("the request is not valid HTTP: ") and "b'" not in message, message
    assert "bytearray" not in message and "\n" not in message, message
    assert error == {"type": "invalid_request_error", "param": None, "code": "bad_request"}
    refused = [e for e in daemon.logs() if e.get("event") == "http_refused"][-1]
    assert refused["status"] == 400 and refused["code"] == "bad_request", refused
    assert refused["method"] is None and refused["path"] is None and refused["error"]
    assert refused["peer_uid"] >= 0 and refused["peer_pid"] > 0


def test_a_burst_of_malformed_requests_leaves_json_lines_only(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, daemon="max_connections_per_uid = 65536")
                     + f"[http]\nmax_body = {MAX_BODY}\nheader_timeout = 2.0\n")
    codes = set()
    for what in itertools.islice(itertools.cycle(MALFORMED), 100):
        status, _, body = exchange(raw_unix(d), MALFORMED[what])
        assert 400 <= status < 500, (what, status, body)
        error = json.loads(body)["error"]  # every refusal in OpenAI's shape
        assert error["type"] == "invalid_request_error" and error["code"], (what, error)
        codes.add(error["code"])
    assert codes == {"bad_request", "not_found", "method_not_allowed", "body_too_large"}
    time.sleep(1.1)  # a new second of the rate limit: the next line counts those held back
    exchange(raw_unix(d), MALFORMED["bad JSON"])
    d.assert_serving()  # and a good request still completes

    text = d.logfile.read_text()
    events = []
    for line in text.splitlines():
        assert line.startswith("{"), f"a line outside JSON: {line[:200]!r}"
        events.append(json.loads(line))
    assert "Traceback" not in text  # malformed input is the client's error: no traceback
    assert not [e for e in events if e["level"] in ("error", "critical")], [
        e for e in events if e["level"] in ("error", "critical")]
    refused = [e for e in events if e["event"] == "http_refused"]
    assert all(e["level"] == "info" and 400 <= e["status"] < 500 for e in refused)
    # Each refusal is either a line or counted in a later line's `suppressed`.
    assert sum(1 + e.get("suppressed", 0) for e in refused) == 101, refused
