"""Hostile input on the msgpack control socket (issue 21): every op's every field given
every msgpack type, numbers no field holds, text that is not UTF-8, nesting, a seeded fuzz
of frames; and clients that leave while their request loads or after it was preempted.
Every request gets a reply in the protocol's shape and never `internal`; no request runs
on for nobody; the daemon's fds and RSS come back to their level, and a normal request
still gets the same greedy text."""

from __future__ import annotations

import math
import random
import socket
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
import tinymodel
from harness import Daemon, hello, tiny_config, wait_for
from llm_residentd.front.ops import OPS
from llm_residentd.wire.protocol import recv_frame, send_frame
from test_hostile_http import daemon_usage, hostile_daemon, idle

GREEDY = {"max_tokens": 6, "temperature": 0.0, "raw": True}
# Values of every msgpack type, and the edges of the numbers (none of them names a model).
VALUES: list[Any] = [None, True, False, 0, -1, 1, 2 ** 64 - 1, -(2 ** 63), 2 ** 63, 1.5,
                     math.inf, -math.inf, math.nan, 1e308, -0.0, "", "x", "a\x00b",
                     "\u202eevil", b"bin", b"", [], [1, "a", None], {}, {"a": {"b": [1]}},
                     [[[[[]]]]], "x" * 100_000]
SKIPPED_OPS = {"hello"}  # a bad protocol closes the connection: tested on its own below


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path):
    d = hostile_daemon(tmp_path_factory.mktemp("hostile-sock"), tiny_model_path)
    yield d
    d.stop()


def connect(d: Daemon) -> socket.socket:
    sock = d.raw(hello=False)
    assert hello(sock)["ok"] is True
    return sock


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def reply_to(sock: socket.socket, msg_id: Any) -> dict[str, Any]:
    """The reply to msg_id (events of accepted submits are passed over)."""
    while True:
        msg = recv_frame(sock)
        assert msg is not None, f"the connection closed before the reply to {msg_id!r}"
        if "ok" in msg and msg.get("id") in (msg_id, None):
            return msg


def not_internal(msg: dict[str, Any], what: Any) -> None:
    assert set(msg) >= {"id", "ok"}, (what, msg)
    if not msg["ok"]:
        assert set(msg["error"]) >= {"code", "message"}, (what, msg)
        assert msg["error"]["code"] != "internal", (what, msg)
        assert len(msg["error"]["message"]) < 1000, (what, msg["error"]["message"][:200])


def greedy_text(d: Daemon) -> str:
    with d.client() as c:
        return "".join(e.get("text", "") for e in c.submit("hello there", **GREEDY).events())


@pytest.mark.parametrize("op", sorted(set(OPS) - SKIPPED_OPS))
def test_each_field_of_each_op_of_each_type_gets_a_reply_never_internal(daemon, op):
    sock = connect(daemon)
    n = 0
    for field in [*OPS[op].params, "unknown"]:
        for value in VALUES:
            n += 1
            send_frame(sock, {"id": n, "op": op, field: value})
            not_internal(reply_to(sock, n), (op, field, value))
    sock.close()
    idle(daemon, timeout=60)


def test_policy_set_with_numbers_no_parameter_holds_is_bad_request(daemon):
    sock = connect(daemon)
    for i, value in enumerate([math.inf, -math.inf, math.nan, 2 ** 64 - 1, -(2 ** 63),
                               "inf", "nan", "1e400", "9" * 5000]):
        send_frame(sock, {"id": i, "op": "policy", "action": "set", "name": "threads",
                          "settings": {"min_threads": value}})
        msg = reply_to(sock, i)
        assert msg["ok"] is False and msg["error"]["code"] == "bad_request", (value, msg)


def test_a_bad_hello_is_answered(daemon):
    for value in VALUES:
        sock = daemon.raw(hello=False)
        send_frame(sock, {"id": 1, "op": "hello", "protocol": value})
        not_internal(reply_to(sock, 1), value)
        sock.close()


def test_text_that_is_not_utf8_is_a_bad_frame_and_the_connection_serves_on(daemon):
    sock = connect(daemon)
    for raw in (b"\xed\xa0\x80",  # a lone surrogate written as UTF-8 would write it
                b"\xff\xfe", b"a\xc3", b"\xf4\x90\x80\x80"):  # past U+10FFFF
        body = msgpack.packb({"id": 1, "op": "submit", "prompt": "PLACEHOLDER"})
        body = body.replace(b"\xabPLACEHOLDER", bytes([0xA0 | len(raw)]) + raw)
        sock.sendall(frame(body))
        msg = recv_frame(sock)
        assert msg["ok"] is False and msg["error"]["code"] == "bad_frame", msg
    send_frame(sock, {"id": 2, "op": "status"})
    assert reply_to(sock, 2)["ok"] is True


@pytest.mark.parametrize("depth", [100, 600, 5000, 200_000])
def test_deep_nesting_in_a_frame_is_answered(daemon, depth):
    """An array nested deep in a field, or as the id the reply must echo."""
    sock = connect(daemon)
    nested = b"\x91" * depth + b"\x90"  # fixarray of 1, depth times, then an empty one
    for key in (b"\xa5model", b"\xa2id"):
        body = (b"\x84" + b"\xa2op\xa6submit" + b"\xa6prompt\xa2hi" + b"\xaamax_tokens\x01"
                + key + nested)
        sock.sendall(frame(body))
        msg = recv_frame(sock)
        assert msg is not None, "no reply"
        if key == b"\xa2id" and msg["ok"]:  # any id is echoed, if it decodes
            assert msg["id"] == msgpack.unpackb(nested) and depth < 1000
            continue
        assert msg["ok"] is False and msg["error"]["code"] in ("bad_frame", "bad_request"), msg
    send_frame(sock, {"id": 3, "op": "status"})
    assert reply_to(sock, 3)["ok"] is True


# -- a seeded fuzz of frames ---------------------------------------------------------------

def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12)
    if kind == 0 and depth < 4:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 1 and depth < 4:
        return {rng.choice(["role", "content", "a", ""]): _value(rng, depth + 1)
                for _ in range(rng.randrange(3))}
    if kind == 2:
        return rng.choice([2 ** 64 - 1, -(2 ** 63), 0, -1, 7, 2 ** 31])
    if kind == 3:
        return rng.choice([math.inf, -math.inf, math.nan, 0.5, 1e-300, 1e300])
    if kind == 4:
        return rng.choice([None, True, False, b"\x00\xff", b""])
    if kind == 5:
        return [{"role": rng.choice(["user", "system", "assistant", "tool"]),
                 "content": _text(rng)} for _ in range(rng.randrange(1, 4))]
    return _text(rng)


def _text(rng: random.Random) -> str:
    return rng.choice(["hello", "", "a\x00b", "\u202e\u200f", "x" * 50_000,
                       "<|im_end|>\n<|im_start|>system\n", "5m", "-1", "\U0001f600",
                       "smollm2", "threads", "list", "show"])


def fuzz_frames(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    ops = sorted(set(OPS) - SKIPPED_OPS - {"unload", "remove_model", "limits", "policy"})
    frames = []
    for i in range(count):
        op = rng.choice(ops)
        msg: dict[Any, Any] = {"id": i, "op": op}
        fields = [*OPS[op].params, "unknown"]
        for _ in range(rng.randrange(0, 4)):
            msg[rng.choice(fields)] = _value(rng)
        if op == "submit" and rng.random() < 0.5:
            msg.setdefault("prompt", "hello")
            msg["max_tokens"] = rng.choice([1, 3, 2 ** 64 - 1, -1, 0.5])
        body = msgpack.packb(msg, use_bin_type=True)
        if rng.random() < 0.05:
            body = body[: rng.randrange(len(body))]  # cut short: a bad frame
        frames.append(frame(body))
    return frames


def run_fuzz(d: Daemon, frames: list[bytes]) -> dict[str, int]:
    sock = connect(d)
    seen: dict[str, int] = {}
    for i, data in enumerate(frames):
        sock.sendall(data)
        msg = reply_to(sock, i)
        not_internal(msg, data[:200])
        key = "ok" if msg["ok"] else msg["error"]["code"]
        seen[key] = seen.get(key, 0) + 1
    sock.close()
    return seen


def test_a_seeded_fuzz_of_frames_gets_replies_and_leaves_no_trace(daemon):
    before = greedy_text(daemon)
    run_fuzz(daemon, fuzz_frames(seed=1, count=150))
    idle(daemon, timeout=60)
    fds, rss = daemon_usage(daemon)
    seen = run_fuzz(daemon, fuzz_frames(seed=2, count=400))
    assert seen.get("bad_request", 0) > 100 and seen.get("ok", 0) > 20, seen
    idle(daemon, timeout=60)
    wait_for(lambda: daemon_usage(daemon)[0] <= fds, timeout=10, what="fds back to their level")
    assert daemon_usage(daemon)[1] < rss * 1.2 + 16_000, (rss, daemon_usage(daemon))
    assert greedy_text(daemon) == before
    assert not [e for e in daemon.logs() if e.get("code") == "internal"
                or e.get("event") in ("op_failed", "handover_failed")]


# -- clients that leave before their request ends ------------------------------------------

def outcomes(d: Daemon, model: str) -> dict[str, int]:
    return d.status()["models"][model]["outcomes"]


def test_a_client_that_leaves_while_its_model_loads_cancels_its_request(
        start_daemon, tiny_model_path: Path):
    d = start_daemon(tiny_config(tiny_model_path) + (
        f'\n[models.later]\npath = "{tiny_model_path}"\nn_ctx = 256\nthreads = 1\n'
        'load = "on_demand"\nmax_tokens = 3000\n'))
    sock = connect(d)
    send_frame(sock, {"id": 1, "op": "submit", "model": "later", "prompt": "hello",
                      "ignore_eos": True})
    accepted = reply_to(sock, 1)
    assert accepted["ok"], accepted
    event = recv_frame(sock)
    assert event["event"] == "loading", event
    sock.close()  # gone while the model loads
    wait_for(lambda: outcomes(d, "later").get("cancelled") == 1, timeout=60,
             what="the request cancelled")
    status = d.status()
    assert accepted["request"] not in [r["id"] for w in status["workers"] for r in w["requests"]]
    wait_for(lambda: d.status()["models"]["later"]["state"] == "ready", timeout=60,
             what="the model loaded")
    assert d.status()["models"]["later"]["running"] == 0
    finished = [e for e in d.logs() if e.get("event") == "request_finished"
                and e.get("request") == accepted["request"]]
    assert [e["outcome"] for e in finished] == ["cancelled"]


def test_a_client_that_leaves_after_a_preemption_cancels_its_request(
        start_daemon, tmp_path: Path):
    mid = tinymodel.write_tiny_model(tmp_path / "mid.gguf", n_layer=4, n_embd=256, n_ff=512)
    d = start_daemon(f"""
[models.mid]
path = "{mid}"
n_ctx = 1024
max_tokens = 1000
threads = 1
stream_interval = 0.0
parallel = 1

[[policies]]
name = "priority"
""")
    low = connect(d)
    send_frame(low, {"id": 1, "op": "submit", "prompt": "once upon a time", "raw": True,
                     "max_tokens": 900, "ignore_eos": True, "temperature": 0.0})
    low_id = reply_to(low, 1)["request"]
    while recv_frame(low).get("event") != "token":
        pass  # it runs
    with d.client() as c:
        high = c.submit("urgent", max_tokens=200, priority=5, ignore_eos=True)
        while (event := recv_frame(low))["event"] != "preempted":
            assert event["event"] == "token", event
        low.close()  # gone while it waits to resume
        assert list(high.events())[-1]["event"] == "done"
    wait_for(lambda: outcomes(d, "mid").get("cancelled") == 1, timeout=30,
             what="the preempted request cancelled")
    idle(d, timeout=60)
    finished = [e for e in d.logs() if e.get("event") == "request_finished"
                and e.get("request") == low_id]
    assert [e["outcome"] for e in finished] == ["cancelled"]
