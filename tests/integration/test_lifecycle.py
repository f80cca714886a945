"""Queueing, priorities, cancellation, timeouts, worker crashes and shutdown, for real."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from harness import read_until_done, reply, request_as, running, tiny_config, wait_for
from llm_residentd.wire.protocol import recv_frame, send_frame

LONG = {"max_tokens": 3000, "ignore_eos": True}  # keeps the single worker busy for a while


def _submit(sock, msg_id, prompt="go", **params):
    send_frame(sock, {"id": msg_id, "op": "submit", "prompt": prompt, **params})


def _accepted(sock, msg_id):
    msg = reply(sock, msg_id)
    assert msg["ok"], msg
    return msg


@pytest.fixture
def busy_daemon(start_daemon, tiny_model_path):
    """One worker, n_ctx 4096, a queue of 3."""
    return start_daemon(tiny_config(tiny_model_path, n_ctx=4096, max_queue=3))


def test_priority_order_and_queue_full(busy_daemon):
    d = busy_daemon
    sock = d.raw()
    _submit(sock, "blocker", **LONG)
    blocker = _accepted(sock, "blocker")["request"]
    wait_for(lambda: running(d.status()) == [blocker], what="blocker running")
    ids = {}
    for name, prio in (("low1", 0), ("low2", 0), ("high", 5)):
        _submit(sock, name, max_tokens=2, priority=prio)
        ids[name] = _accepted(sock, name)["request"]
    # The queue is full: the next is refused at once.
    _submit(sock, "extra", max_tokens=2)
    refused = reply(sock, "extra")
    assert refused["error"]["code"] == "queue_full" and "max_queue 3" in refused["error"]["message"]
    # The queue runs highest priority first, FIFO within a priority.
    queued = d.status()["models"]["tiny"]["queued"]
    assert queued == [ids["high"], ids["low1"], ids["low2"]]
    send_frame(sock, {"id": "c", "op": "cancel", "request": blocker})
    frames = read_until_done(sock, 4)
    done_order = [f["request"] for f in frames if f.get("event") == "done"]
    assert done_order == [ids["high"], ids["low1"], ids["low2"]]
    cancelled = [f for f in frames if f.get("event") == "error"]
    assert cancelled[0]["request"] == blocker and cancelled[0]["error"]["code"] == "cancelled"


def test_cancel_running_stops_within_a_token_and_frees_the_worker(busy_daemon):
    d = busy_daemon
    with d.client() as c:
        stream = c.submit("go", **LONG)
        events = stream.events()
        assert next(events)["event"] == "token"
        c2 = d.client()
        c2.cancel(stream.request)
        rest = list(events)
    assert rest[-1]["event"] == "error" and rest[-1]["error"]["code"] == "cancelled"
    tokens_after = sum(1 for e in rest if e["event"] == "token")
    assert tokens_after < 200  # only what was already in flight on the socket
    st = wait_for(lambda: (s := d.status())["workers"][0]["state"] == "idle" and s,
                  what="worker idle")
    assert st["models"]["tiny"]["outcomes"]["cancelled"] == 1
    # The worker's own log says it stopped early, far short of 3000 tokens.
    d.assert_serving()


def test_cancel_queued_request(busy_daemon):
    d = busy_daemon
    sock = d.raw()
    _submit(sock, "b", **LONG)
    blocker = _accepted(sock, "b")["request"]
    _submit(sock, "q", max_tokens=2)
    queued = _accepted(sock, "q")["request"]
    with d.client() as c:
        assert c.cancel(queued) == {"request": queued, "cancelled": True}
        c.cancel(blocker)
    frames = read_until_done(sock, 2)
    errors = {f["request"]: f["error"]["code"] for f in frames if f.get("event") == "error"}
    assert errors == {queued: "cancelled", blocker: "cancelled"}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_cancel_of_another_users_request_is_forbidden(start_daemon, tiny_model_path):
    sockdir = Path(tempfile.mkdtemp(prefix="llm-test-"))
    sockdir.chmod(0o755)  # pytest's tmp dirs are 0700: another uid could not reach the socket
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096, daemon='socket_mode = "0666"'),
                     socket=sockdir / "llm.sock")
    sock = d.raw()
    _submit(sock, "b", **LONG)
    rid = _accepted(sock, "b")["request"]
    reply = request_as(65534, d.socket, {"id": 1, "op": "cancel", "request": rid})
    assert reply["error"]["code"] == "forbidden" and "uid 0" in reply["error"]["message"]
    reply = request_as(65534, d.socket, {"id": 2, "op": "limits", "model": "tiny", "cpu": "50%"})
    assert reply["error"]["code"] == "forbidden" and "needs root" in reply["error"]["message"]
    reply = request_as(65534, d.socket, {"id": 3, "op": "policy", "action": "set", "name": "static",
                               "settings": {"cpu": "50%"}})
    assert reply["error"]["code"] == "forbidden" and "needs root" in reply["error"]["message"]
    reply = request_as(65534, d.socket, {"id": 4, "op": "policy", "action": "list"})
    assert reply["ok"] is True and "static" in reply["available"]  # reading is for everyone
    with d.client() as c:
        c.cancel(rid)  # root may



def test_timeout_of_queued_and_running_requests(busy_daemon):
    d = busy_daemon
    sock = d.raw()
    _submit(sock, "run", timeout=0.5, **LONG)
    _accepted(sock, "run")
    _submit(sock, "wait", timeout=0.3, max_tokens=2)
    _accepted(sock, "wait")
    t0 = time.monotonic()
    frames = read_until_done(sock, 2)
    errors = [f for f in frames if f.get("event") == "error"]
    assert [e["error"]["code"] for e in errors] == ["timeout", "timeout"]
    assert time.monotonic() - t0 < 3
    wait_for(lambda: d.status()["workers"][0]["state"] == "idle", what="worker idle")


def test_worker_killed_mid_request_fails_it_and_is_restarted(busy_daemon):
    d = busy_daemon
    sock = d.raw()
    _submit(sock, "r", **LONG)
    rid = _accepted(sock, "r")["request"]
    assert recv_frame(sock)["event"] == "token"
    old_pid = d.status()["workers"][0]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    frames = read_until_done(sock, 1)
    err = frames[-1]
    assert err["request"] == rid and err["error"]["code"] == "worker_died"
    assert "signal 9" in err["error"]["message"]
    w = wait_for(lambda: (w := d.status()["workers"][0])["state"] == "idle" and w,
                 what="restarted worker")
    assert w["pid"] != old_pid and w["restarts"] == 1
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == "zombie"
    d.assert_serving()


def test_queued_requests_survive_a_worker_crash(busy_daemon):
    d = busy_daemon
    sock = d.raw()
    _submit(sock, "r", **LONG)
    _accepted(sock, "r")
    _submit(sock, "q", max_tokens=3, ignore_eos=True)
    queued = _accepted(sock, "q")["request"]
    # r's first token, not the worker's "busy": killed before it, r would be queued again
    # and run to its end on the next worker (a request without a token waits for it).
    assert recv_frame(sock)["event"] == "token"
    os.kill(d.status()["workers"][0]["pid"], signal.SIGKILL)
    frames = read_until_done(sock, 2)
    done = [f for f in frames if f.get("event") == "done"]
    assert [f["request"] for f in done] == [queued]  # run by the restarted worker


def test_sigterm_fails_live_requests_and_cleans_up(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096, workers=2))
    workers = [w["pid"] for w in d.status()["workers"]]
    sock = d.raw()
    _submit(sock, "r", **LONG)
    _accepted(sock, "r")
    assert recv_frame(sock)["event"] == "token"
    assert d.stop(signal.SIGTERM) == 0
    frames = read_until_done(sock, 1)
    assert frames[-1]["error"]["code"] == "shutting_down"
    assert not d.socket.exists()
    for pid in workers:
        assert not psutil.pid_exists(pid)
    events = [e["event"] for e in d.logs()]
    assert "daemon_stopped" in events


def test_two_workers_serve_in_parallel(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096, workers=2))
    sock = d.raw()
    _submit(sock, "a", **LONG)
    _submit(sock, "b", **LONG)
    _accepted(sock, "a")
    _accepted(sock, "b")
    st = wait_for(lambda: (s := d.status()) and all(w["state"] == "busy" for w in s["workers"])
                  and s, what="both workers busy")
    assert st["models"]["tiny"]["running"] == 2
    assert len({w["pid"] for w in st["workers"]}) == 2


def test_missing_model_is_unavailable_and_others_serve(start_daemon, tiny_model_path, tmp_path):
    cfg = tiny_config(tiny_model_path) + (f'\n[models.ghost]\npath = "{tmp_path}/none.gguf"\n'
                                          'load = "at_start"\n')
    d = start_daemon(cfg, wait=False)
    wait_for(lambda: d.socket.exists(), what="socket")
    with d.client() as c:
        models = wait_for(lambda: (m := {x["name"]: x for x in c.models()})
                          and m["ghost"]["state"] == "unavailable" and m, what="ghost unavailable")
        assert "does not exist" in models["ghost"]["error"]
    r = d.llmctl("submit", "-m", "ghost", "hi")
    assert r.returncode == 1 and "model_unavailable" in r.stderr and "none.gguf" in r.stderr
    r = d.llmctl("wait", "ghost", "--timeout", "5")
    assert r.returncode == 1 and "does not exist" in r.stderr
    d.llmctl("wait", "tiny")
    d.assert_serving()


def test_corrupt_model_file_is_unavailable(start_daemon, tiny_model_path, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    cfg = tiny_config(tiny_model_path) + f'\n[models.bad]\npath = "{bad}"\nload = "at_start"\n'
    d = start_daemon(cfg, wait=False)
    wait_for(lambda: d.socket.exists(), what="socket")
    with d.client() as c:
        m = wait_for(lambda: (m := {x["name"]: x for x in c.models()})["bad"]["state"]
                     == "unavailable" and m, timeout=30, what="bad unavailable")
    # llama.cpp's own reason, which it only logs (at ERROR, which llama-cpp-python hid).
    assert "cannot load" in m["bad"]["error"] and "bad GGUF version" in m["bad"]["error"], m["bad"]
    d.llmctl("wait", "tiny")
    d.assert_serving()


def test_cancel_during_prompt_evaluation_aborts_it(start_daemon, tmp_path):
    import tinymodel
    model = tinymodel.write_tiny_model(tmp_path / "mid.gguf", n_layer=4, n_embd=256, n_ff=512)
    d = start_daemon(tiny_config(model, n_ctx=4096))  # 3500 prompt tokens take ~2 s to evaluate
    sock = d.raw()
    _submit(sock, "r", prompt="the sky is blue and " * 500, raw=True, max_tokens=4)
    rid = _accepted(sock, "r")["request"]
    wait_for(lambda: d.status()["workers"][0]["state"] == "busy", what="busy")
    with d.client() as c:
        c.cancel(rid)
    wait_for(lambda: d.status()["workers"][0]["state"] == "idle", what="worker idle")
    stopped = [e for e in d.logs() if e.get("event") == "worker_stopped_request"]
    assert [(e["request"], e["stage"], e["completion_tokens"]) for e in stopped] == [(rid, "prefill", 0)]
    d.assert_serving()  # the aborted context was reset and serves again
