"""The http_refused line: its fields, its peer, and its rate limit (issue 21, item 6)."""

from __future__ import annotations

import os
import socket

from llm_residentd.front.http import refused
from structlog.testing import capture_logs


class Transport:
    def __init__(self, **extra: object) -> None:
        self.extra = extra

    def get_extra_info(self, name: str) -> object:
        return self.extra.get(name)


def test_a_refusal_names_status_code_method_path_peer_and_error():
    a, b = socket.socketpair()
    try:
        with capture_logs() as logged:
            refused.Refusals().log(404, "not_found", "GET", "/v2/x" + "y" * 300,
                                   Transport(socket=a), "GET /v2/x: Not Found")
    finally:
        a.close()
        b.close()
    (line,) = logged
    assert line == {"event": "http_refused", "log_level": "info", "status": 404,
                    "code": "not_found", "method": "GET", "path": "/v2/x" + "y" * 195,
                    "peer_uid": os.getuid(), "peer_pid": os.getpid(),
                    "error": "GET /v2/x: Not Found"}


def test_the_peer_is_its_uid_and_pid_on_a_unix_socket_and_its_address_on_tcp():
    with socket.socket() as tcp:  # not a Unix socket: the address counts
        assert refused.peer_fields(Transport(socket=tcp, peername=("127.0.0.1", 5123))) == {
            "peer": "127.0.0.1:5123"}
    assert refused.peer_fields(None) == {}  # the connection is gone


def test_at_most_rate_lines_a_second_and_the_next_line_counts_those_held_back():
    now = [1000.0]
    refusals = refused.Refusals(rate=3, clock=lambda: now[0])
    with capture_logs() as logged:
        for i in range(10):
            now[0] += 0.01
            refusals.log(400, "bad_request", None, None, None, f"bad {i}")
        now[0] += 1.0  # a new second: logging resumes, with the count
        refusals.log(401, "invalid_api_key", "POST", "/v1/completions", None, "no key")
        refusals.log(401, "invalid_api_key", "POST", "/v1/completions", None, "no key")
    assert [(e["error"], e.get("suppressed")) for e in logged] == [
        ("bad 0", None), ("bad 1", None), ("bad 2", None), ("no key", 7), ("no key", None)]
    assert logged[0]["method"] is None and logged[0]["path"] is None
