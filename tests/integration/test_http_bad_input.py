"""Bad HTTP input: each gets a clear error or a timely close, and others are still served."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time

import pytest
from harness import tiny_config
from http_helpers import http_socket, post_bytes, raw_unix, tcp_client, unix_http

KEY = "k" * 24


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.fixture(scope="module")
def strict_daemon(tmp_path_factory, tiny_model_path):
    """Short header/body deadline, a small body bound, room for 1,000 idle connections."""
    from harness import Daemon
    d = Daemon(tmp_path_factory.mktemp("httpbad"), tiny_config(
        tiny_model_path, daemon="max_connections = 1100\nmax_connections_per_uid = 65536")
        + "[http]\nmax_body = 2048\nheader_timeout = 1.0\nkeepalive_timeout = 2.0\n")
    d.start()
    yield d
    d.stop()


def test_body_over_max_body_is_413(strict_daemon):
    r = unix_http(strict_daemon, "POST", "/v1/completions",
                  {"model": "tiny", "prompt": "x" * 4000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert "http.max_body" in r.json()["error"]["message"]
    sock = raw_unix(strict_daemon)  # chunked, without a Content-Length
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 b"\r\n" + b"".join(b"400\r\n" + b"x" * 1024 + b"\r\n" for _ in range(3))
                 + b"0\r\n\r\n")
    assert _read_all(sock).startswith(b"HTTP/1.1 413")
    strict_daemon.assert_serving()


def test_slow_headers_are_closed_and_others_served(strict_daemon):
    sock = raw_unix(strict_daemon)
    start = time.monotonic()
    try:
        for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" * 3:
            sock.sendall(bytes([byte]))
            time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert _read_all(sock) == b"" and time.monotonic() - start < 5
    silent = raw_unix(strict_daemon)  # connects and sends nothing at all
    assert _read_all(silent) == b""
    r = unix_http(strict_daemon, "POST", "/v1/completions",
                  {"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200


def test_slow_body_gets_408(strict_daemon):
    sock = raw_unix(strict_daemon)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    start = time.monotonic()
    reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
    assert time.monotonic() - start < 5


def test_a_thousand_idle_connections(strict_daemon):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    idle = [raw_unix(strict_daemon) for _ in range(1000)]
    try:
        start = time.monotonic()
        r = unix_http(strict_daemon, "POST", "/v1/completions",
                      {"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and time.monotonic() - start < 30
        for sock in idle:  # each is closed by the daemon after header_timeout
            sock.settimeout(10)
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
    strict_daemon.assert_serving()


def test_keep_alive_connection_is_reused_then_closed_when_idle(strict_daemon):
    sock = raw_unix(strict_daemon)
    for _ in range(2):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while b'"status"' not in got:
            got += sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 200")
    start = time.monotonic()
    assert _read_all(sock) == b"" and time.monotonic() - start < 6  # keepalive_timeout 2


def test_connections_beyond_max_connections_are_refused(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, daemon="max_connections = 3"))
    held = [raw_unix(d) for _ in range(3)]
    extra = raw_unix(d)
    reply = _read_all(extra)
    assert reply.startswith(b"HTTP/1.1 503") and b"too_many_connections" in reply
    for sock in held:
        sock.close()
    time.sleep(0.2)
    assert unix_http(d, "GET", "/health").status_code == 200


def test_api_key_required_on_tcp(start_daemon, tiny_model_path, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# name key\nalice {KEY}\n")
    d = start_daemon(tiny_config(tiny_model_path)
                     + f'[http]\nlisten = "127.0.0.1:0"\napi_keys_file = "{keys}"\n')
    import openai
    with pytest.raises(openai.AuthenticationError) as err:
        tcp_client(d, key="w" * 24).models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    reply = tcp_client(d, key=KEY).completions.create(model="tiny", prompt="x", max_tokens=2)
    accepted = [e for e in d.logs() if e.get("event") == "http_request"]
    assert accepted[-1]["peer"] == "alice" and accepted[-1]["request"] == reply.id[5:]
    assert unix_http(d, "GET", "/v1/models").status_code == 200  # the socket's mode admits
    # the key exactly: a no-break space (raw bytes C2 A0) after it is no match
    port = int(tcp_client(d).base_url.port)
    for tail in (b"\xc2\xa0", b"\xa0", b"x"):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Authorization: Bearer " + KEY.encode() + tail + b"\r\n\r\n")
            assert _read_all(sock).startswith(b"HTTP/1.1 401"), tail


@pytest.mark.parametrize("http, words", [
    ('listen = "0.0.0.0:11435"', "http.listen"),
    ('listen = "localhost"', "http.listen"),
    ('listen = "127.0.0.1:1"\napi_keys_file = "/nonexistent/keys"', "http.api_keys_file"),
])
def test_network_listen_without_keys_refuses_to_start(tmp_path, tiny_model_path, http, words):
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config(tiny_model_path) + f"[http]\n{http}\n")
    out = subprocess.run([sys.executable, "-m", "llm_residentd", "--config", str(cfg),
                          "--socket", str(tmp_path / "s.sock")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and words in out.stderr, out.stderr
    assert not (tmp_path / "s.sock").exists()


def test_bad_input_leaves_streams_intact(strict_daemon):
    """Garbage on one connection does not disturb a stream on another."""
    stream = raw_unix(strict_daemon)
    stream.sendall(post_bytes("/v1/completions", json.dumps(
        {"model": "tiny", "prompt": "x", "max_tokens": 8, "stream": True}).encode()))
    bad = raw_unix(strict_daemon)
    bad.sendall(b"\x00\xff garbage \r\n\r\n")
    assert _read_all(bad).split(b"\r\n")[0].endswith(b" 400 Bad Request")
    assert b"data: [DONE]\n\n" in _read_all(stream)
    assert http_socket(strict_daemon).exists()


def test_without_aiohttp_the_default_http_socket_is_skipped(start_daemon, tiny_model_path,
                                                           tmp_path, monkeypatch):
    """A checkout without aiohttp still serves the msgpack socket; configured HTTP fails."""
    fake = tmp_path / "fake"
    (fake / "aiohttp").mkdir(parents=True)
    (fake / "aiohttp" / "__init__.py").write_text("raise ImportError('no aiohttp here')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    d = start_daemon(tiny_config(tiny_model_path))
    d.assert_serving()
    assert not http_socket(d).exists()
    assert [e for e in d.logs() if e.get("event") == "http_unavailable"]
    d2 = start_daemon(tiny_config(tiny_model_path) + '[http]\nlisten = "127.0.0.1:0"\n',
                      wait=False)
    assert d2.proc.wait(60) == 1
    assert "the HTTP API is configured but cannot run" in d2.logfile.read_text()
