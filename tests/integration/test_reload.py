"""SIGHUP reloads the config file: models added serve, removed ones drain, changed ones
restart their workers after their requests, a bad file is refused (daemon/core/reload.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from harness import Daemon, read_until_done, tiny_config, wait_for
from llm_residentd.wire.protocol import recv_frame, send_frame
from llmctl import LlmctlError

LONG = {"max_tokens": 1500, "ignore_eos": True}  # keeps a worker busy for a few seconds


def _model(name: str, path: Path, extra: str = "") -> str:
    """One slot (parallel = 1), as tiny_config: a second request waits behind the first.
    Loaded at start, as the first model: these tests are about the reload, not the lifecycle."""
    return (f'\n[models.{name}]\npath = "{path}"\nn_ctx = 4096\nthreads = 1\nmax_tokens = 16\n'
            f'parallel = 1\nload = "at_start"\n{extra}')


def _reload(d: Daemon, config: str) -> dict:
    """Write the config, send SIGHUP, and return the daemon's record of that reload."""
    before = (d.status()["daemon"].get("reload") or {}).get("at", 0)
    d.config.write_text(config)
    d.proc.send_signal(signal.SIGHUP)
    return wait_for(lambda: (r := d.status()["daemon"].get("reload")) and r["at"] > before and r,
                    timeout=30, what="the reload")


def _pids(d: Daemon, model: str) -> list[int]:
    return [w["pid"] for w in d.status()["workers"] if w["model"] == model]


def _ready(d: Daemon, model: str, timeout: float = 60) -> None:
    wait_for(lambda: d.status()["models"].get(model, {}).get("state") == "ready",
             timeout=timeout, what=f"model {model} ready")


def _submit(sock, msg_id, model, **params):
    send_frame(sock, {"id": msg_id, "op": "submit", "prompt": "go", "model": model, **params})
    while True:
        msg = recv_frame(sock)
        if msg.get("id") == msg_id and "ok" in msg:
            assert msg["ok"], msg
            return msg["request"]


def _events(d: Daemon, name: str) -> list[dict]:
    return [e for e in d.logs() if e.get("event") == name]


def test_sighup_adds_a_model_that_serves(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, max_queue=8))
    tiny_pid = _pids(d, "tiny")
    new = (tiny_config(tiny_model_path, max_queue=3) + _model("added", tiny_model_path)
           + '\n[[policies]]\nname = "threads"\nenabled = false\n')
    r = _reload(d, new)
    assert r["result"] == "ok" and r["error"] is None, r
    assert r["added"] == ["added"] and r["removed"] == [] and r["changed"] == ["tiny"]
    _ready(d, "added")
    with d.client() as c:
        events = list(c.submit("hello", model="added", max_tokens=4).events())
        policies = c.call("policy", action="list")
    assert events[-1]["event"] == "done" and events[-1]["stats"]["model"] == "added"
    st = d.status()
    # max_queue changes live: tiny's worker was not restarted for it.
    assert st["models"]["tiny"]["max_queue"] == 3 and _pids(d, "tiny") == tiny_pid
    assert "threads" not in policies["enabled"] and "threads" in policies["disabled"]
    applied = _events(d, "reload_applied")
    assert applied and applied[-1]["added"] == ["added"] and applied[-1]["changed"] == ["tiny"]
    assert _events(d, "reload_requested")
    out = d.llmctl("status")
    assert out.returncode == 0 and "last reload" in out.stdout and "added added" in out.stdout


def test_removed_model_finishes_its_requests_then_stops(start_daemon, tiny_model_path):
    both = tiny_config(tiny_model_path, n_ctx=4096) + _model("gone", tiny_model_path)
    d = start_daemon(both)
    _ready(d, "gone")
    (gone_pid,) = _pids(d, "gone")
    sock = d.raw()
    running = _submit(sock, "r", "gone", **LONG)
    assert recv_frame(sock)["event"] == "token"
    queued = _submit(sock, "q", "gone", max_tokens=3, ignore_eos=True)
    r = _reload(d, tiny_config(tiny_model_path, n_ctx=4096))
    assert r["result"] == "ok" and r["removed"] == ["gone"], r
    st = d.status()
    assert st["models"]["gone"]["state"] == "draining"
    assert st["models"]["gone"]["running"] == 1 and st["models"]["gone"]["queued"] == [queued]
    with d.client() as c, pytest.raises(LlmctlError) as exc:
        c.submit("more", model="gone")
    assert exc.value.code == "no_such_model"
    frames = read_until_done(sock, 2)
    ends = {f["request"]: f for f in frames if f.get("event") in ("done", "error")}
    assert ends[running]["event"] == "done" and ends[queued]["event"] == "done", ends
    wait_for(lambda: "gone" not in d.status()["models"], timeout=30, what="gone dropped")
    assert not psutil.pid_exists(gone_pid) or psutil.Process(gone_pid).status() == "zombie"
    assert _events(d, "model_removed")
    d.assert_serving()


def test_changed_model_restarts_after_its_request_and_others_are_untouched(
        start_daemon, tiny_model_path):
    base = tiny_config(tiny_model_path, n_ctx=4096) + _model("other", tiny_model_path)
    d = start_daemon(base)
    _ready(d, "other")
    (tiny_pid,), (other_pid,) = _pids(d, "tiny"), _pids(d, "other")
    sock = d.raw()
    running = _submit(sock, "r", "tiny", **LONG)
    assert recv_frame(sock)["event"] == "token"
    r = _reload(d, base.replace("n_ctx = 4096", "n_ctx = 2048", 1))
    assert r["result"] == "ok" and r["changed"] == ["tiny"] and r["added"] == [], r
    # The running request keeps its worker until it is done.
    w = next(w for w in d.status()["workers"] if w["model"] == "tiny")
    assert w["pid"] == tiny_pid and [r["id"] for r in w["requests"]] == [running]
    frames = read_until_done(sock, 1)
    assert frames[-1]["event"] == "done" and frames[-1]["request"] == running, frames[-1]
    w = wait_for(lambda: (w := next(w for w in d.status()["workers"] if w["model"] == "tiny"))
                 ["state"] == "idle" and w["pid"] != tiny_pid and w, timeout=60,
                 what="tiny's new worker")
    assert w["n_ctx"] == 2048
    (other,) = [w for w in d.status()["workers"] if w["model"] == "other"]
    assert other["pid"] == other_pid and other["restarts"] == 0
    with d.client() as c:
        models = {m["name"]: m for m in c.models()}
    assert models["tiny"]["n_ctx"] == 2048 and models["other"]["n_ctx"] == 4096
    d.assert_serving()


def test_bad_config_is_refused_and_the_old_one_serves(start_daemon, tiny_model_path):
    good = tiny_config(tiny_model_path)
    d = start_daemon(good)
    (pid,) = _pids(d, "tiny")
    r = _reload(d, good.replace("n_ctx = 256", 'n_ctx = "big"') + _model("new", tiny_model_path))
    assert r["result"] == "failed" and "models.tiny.n_ctx" in r["error"], r
    assert d.proc.poll() is None and d.socket.exists()
    st = d.status()
    assert set(st["models"]) == {"tiny"} and _pids(d, "tiny") == [pid]
    d.assert_serving()
    (failed,) = _events(d, "reload_failed")
    assert failed["level"] == "error" and failed["key"] == "models.tiny.n_ctx"
    out = d.llmctl("status")
    assert "last reload" in out.stdout and "failed" in out.stdout and "models.tiny.n_ctx" in out.stdout
    # A fixed file is taken by the next SIGHUP.
    assert _reload(d, good.replace("n_ctx = 256", "n_ctx = 512"))["result"] == "ok"


def test_a_model_file_that_is_no_gguf_is_refused_by_name(start_daemon, tiny_model_path, tmp_path):
    good = tiny_config(tiny_model_path)
    d = start_daemon(good)
    (pid,) = _pids(d, "tiny")
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model")
    for path in (tmp_path / "no-such.gguf", bad):
        r = _reload(d, good + _model("new", path))
        assert r["result"] == "failed" and "models.new.path" in r["error"], r
        assert set(d.status()["models"]) == {"tiny"} and _pids(d, "tiny") == [pid]
    assert "no such file" in _events(d, "reload_failed")[0]["error"]
    d.assert_serving()


def test_sighup_during_startup_does_not_kill_the_daemon(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path), wait=False)
    # As early as the process can take it: once it has a handler for SIGHUP (SigCgt bit 0),
    # before it listens; 10 s without one, send it anyway (the old daemon had none).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _catches_sighup(d.proc.pid):
        time.sleep(0.001)
    os.kill(d.proc.pid, signal.SIGHUP)
    from llmctl.commands.wait import wait_ready

    wait_ready(str(d.socket), None, 180)
    assert d.proc.poll() is None
    wait_for(lambda: _events(d, "reload_applied"), timeout=30, what="the reload after startup")
    d.assert_serving()


def _catches_sighup(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & 1)
    return False


def test_a_limit_the_backend_cannot_apply_is_reported_and_nothing_restarts(
        start_daemon, tiny_model_path):
    cfg = tiny_config(tiny_model_path, daemon='backend = "none"')
    d = start_daemon(cfg)
    (pid,) = _pids(d, "tiny")
    r = _reload(d, cfg.replace("[models.tiny]", '[models.tiny]\ncpu = "50%"'))
    assert r["result"] == "partial" and r["changed"] == ["tiny"], r
    assert "models.tiny: limits not applied" in r["error"] and "none backend" in r["error"]
    assert _pids(d, "tiny") == [pid]
    d.assert_serving()
