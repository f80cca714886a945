"""Fair access: per-uid limits on connections and queued requests, root's reserve, and a
listen backlog that takes a burst of max_connections connects."""

from __future__ import annotations

import os
import signal
import socket

import pytest
from harness import (
    OTHER_UID,
    connect_as,
    hello,
    read_until_done,
    running,
    shared_socket_dir,
    tiny_config,
    wait_for,
)
from llm_residentd.front.fairness import ROOT_RESERVE
from llm_residentd.wire.protocol import recv_frame, send_frame

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="LOUD SKIP: needs root to connect as other uids")
LONG = {"max_tokens": 3000, "ignore_eos": True}  # keeps the single worker busy


def _shared_daemon(start_daemon, model, daemon: str = "", **kw):
    """A daemon whose socket every uid may reach."""
    cfg = tiny_config(model, daemon=f'socket_mode = "0666"\n{daemon}', **kw)
    return start_daemon(cfg, socket=shared_socket_dir() / "llm.sock")


def _refused(sock: socket.socket) -> dict:
    """The too_many_connections frame a refused peer gets, then end of stream."""
    reply = recv_frame(sock)
    assert reply["id"] is None and reply["error"]["code"] == "too_many_connections", reply
    assert recv_frame(sock) is None
    return reply["error"]


@needs_root
def test_global_limit_leaves_a_reserve_for_root(start_daemon, tiny_model_path):
    d = _shared_daemon(start_daemon, tiny_model_path, "max_connections = 3")
    held = [connect_as(OTHER_UID, d.socket) for _ in range(3)]
    assert all(hello(s)["ok"] for s in held)
    err = _refused(connect_as(OTHER_UID, d.socket))
    assert "max_connections" in err["message"]
    _refused(connect_as(OTHER_UID - 1, d.socket))  # any other uid too
    # Root still gets in, for admin ops, up to ROOT_RESERVE connections past the limit.
    admin = [d.raw() for _ in range(ROOT_RESERVE)]  # each says hello
    send_frame(admin[0], {"id": 1, "op": "status"})
    assert recv_frame(admin[0])["ok"] is True
    assert "for root" in _refused(d.raw(hello=False))["message"]  # the reserve is bounded
    admin.pop().close()
    wait_for(lambda: hello(d.raw(hello=False)).get("ok"), what="root's freed slot")


@needs_root
def test_one_uid_cannot_take_every_connection(start_daemon, tiny_model_path):
    d = _shared_daemon(start_daemon, tiny_model_path, "max_connections_per_uid = 2")
    mine = [connect_as(OTHER_UID, d.socket) for _ in range(2)]
    assert all(hello(s)["ok"] for s in mine)
    err = _refused(connect_as(OTHER_UID, d.socket))
    assert f"uid {OTHER_UID}" in err["message"] and "max_connections_per_uid 2" in err["message"]
    # Another uid is not affected, and the uid gets a slot back when it closes one.
    assert hello(connect_as(OTHER_UID - 1, d.socket))["ok"]
    mine.pop().close()
    wait_for(lambda: hello(connect_as(OTHER_UID, d.socket)).get("ok"), what="a freed slot")


def _submit(sock: socket.socket, msg_id: str, **params) -> dict:
    send_frame(sock, {"id": msg_id, "op": "submit", "prompt": "go", **params})
    while True:
        msg = recv_frame(sock)
        if msg.get("id") == msg_id and "ok" in msg:
            return msg


def test_one_uid_cannot_fill_a_models_queue(start_daemon, tiny_model_path):
    d = _shared_daemon(start_daemon, tiny_model_path, n_ctx=4096, max_queue=8,
                       model_extra="max_queue_per_uid = 2")
    sock = d.raw()
    blocker = _submit(sock, "blocker", **LONG)["request"]
    wait_for(lambda: running(d.status()) == [blocker], what="blocker running")
    assert _submit(sock, "q1", max_tokens=2)["ok"] and _submit(sock, "q2", max_tokens=2)["ok"]
    refused = _submit(sock, "q3", max_tokens=2)
    assert refused["error"]["code"] == "too_many_requests", refused
    assert "max_queue_per_uid 2" in refused["error"]["message"]
    assert len(d.status()["models"]["tiny"]["queued"]) == 2  # nothing was queued
    # A request that leaves the queue (starts) frees the uid's place.
    send_frame(sock, {"id": "c", "op": "cancel", "request": blocker})
    wait_for(lambda: len(d.status()["models"]["tiny"]["queued"]) < 2, what="q1 started")
    assert _submit(sock, "q4", max_tokens=2)["ok"]
    wait_for(lambda: _idle(d), what="the queue to drain")
    if os.geteuid() != 0:
        pytest.skip("LOUD SKIP: the other-uid half needs root (own-uid half passed)")
    blocker = _submit(sock, "blocker2", **LONG)["request"]
    wait_for(lambda: running(d.status()) == [blocker], what="blocker2 running")
    assert _submit(sock, "q5", max_tokens=2)["ok"] and _submit(sock, "q6", max_tokens=2)["ok"]
    other = connect_as(OTHER_UID, d.socket)
    assert hello(other)["ok"]
    assert _submit(other, "theirs", max_tokens=2)["ok"]  # another uid still gets in
    send_frame(sock, {"id": "c2", "op": "cancel", "request": blocker})
    read_until_done(other, 1)


def _idle(d) -> bool:
    status = d.status()
    return not status["models"]["tiny"]["queued"] and running(status) == []


def test_a_burst_of_max_connections_connects_is_queued(start_daemon, tiny_model_path):
    """Every connect of a burst as large as max_connections is queued by the kernel while
    the daemon cannot accept (stopped here), none gets EAGAIN; then each is served."""
    d = start_daemon(tiny_config(tiny_model_path, daemon="max_connections_per_uid = 256"))
    socks, failed = [], []
    d.proc.send_signal(signal.SIGSTOP)
    try:
        for _ in range(256):  # the default max_connections
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(d.socket))
            except BlockingIOError as exc:
                failed.append(exc)
            socks.append(s)
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert not failed, f"{len(failed)} of 256 connects failed: {failed[0]}"
    for s in socks:
        s.setblocking(True)
        s.settimeout(30)
        assert hello(s)["ok"] is True
        s.close()
