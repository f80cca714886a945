"""`llmctl models add/remove` (the add_model and remove_model ops): a model added at run
time serves, bad input changes nothing, a removal drains, and a reload of the config
file (SIGHUP) keeps what they did."""

from __future__ import annotations

import json
import os
import shutil
import signal

import psutil
import pytest
from harness import (
    Daemon,
    read_until_done,
    reply,
    request_as,
    shared_socket_dir,
    submit_raw,
    tiny_config,
    wait_for,
)
from llm_residentd.wire.protocol import recv_frame, send_frame
from llmctl import LlmctlError

LONG = {"max_tokens": 1500, "ignore_eos": True}  # keeps a worker busy for a few seconds


def _models(d: Daemon) -> dict[str, dict]:
    with d.client() as c:
        return {m["name"]: m for m in c.models()}


def _ready(d: Daemon, model: str, timeout: float = 60) -> None:
    """Loaded and serving: an added model loads on demand, so load it."""
    r = d.llmctl("load", model, "--timeout", str(timeout))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: _models(d).get(model, {}).get("state") == "ready", timeout=timeout,
             what=f"model {model} ready")


def _call(d: Daemon, op: str, **fields) -> dict:
    sock = d.raw()
    try:
        send_frame(sock, {"id": "a", "op": op, **fields})
        return reply(sock, "a")
    finally:
        sock.close()


def _events(d: Daemon, name: str) -> list[dict]:
    return [e for e in d.logs() if e.get("event") == name]


def _submit_text(d: Daemon, model: str) -> dict:
    with d.client() as c:
        events = list(c.submit("hello there", model=model, max_tokens=4).events())
    assert events[-1]["event"] == "done", events
    return events[-1]["stats"]


def test_add_then_submit(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path))
    r = d.llmctl("models", "add", "extra", "--path", str(tiny_model_path), "--n-ctx", "512",
                 "--workers", "2", "--set", "max_tokens=8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("added extra: unloaded, 2 worker(s), n_ctx 512"), r.stdout
    # Not the first model: it loads on demand, at its first request.
    assert _submit_text(d, "extra")["model"] == "extra"
    listed = _models(d)
    assert list(listed) == ["tiny", "extra"]
    assert listed["extra"]["n_ctx"] == 512 and listed["extra"]["max_tokens"] == 8
    assert listed["extra"]["workers"] == 2 and listed["extra"]["source"] == str(tiny_model_path)
    st = d.status()
    assert st["models"]["extra"]["state"] == "ready"
    assert sorted(w["name"] for w in st["workers"] if w["model"] == "extra") == [
        "extra-0", "extra-1"]
    out = d.llmctl("models")
    assert out.returncode == 0 and any(line.split()[:2] == ["extra", "ready"]
                                       for line in out.stdout.splitlines())
    (added,) = _events(d, "model_added")
    assert added["model"] == "extra" and added["by_uid"] == 0
    d.assert_serving()  # the first model is untouched


def test_add_refuses_bad_input_and_changes_nothing(start_daemon, tiny_model_path, tmp_path):
    d = start_daemon(tiny_config(tiny_model_path))
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    cases = [
        ({"name": "x", "path": str(text)}, "bad_request",
         f"{text}: not a GGUF file (it starts with b'not ', not b'GGUF')"),
        ({"name": "x", "path": str(tmp_path / "gone.gguf")}, "bad_request",
         f"{tmp_path}/gone.gguf: no such file"),
        ({"name": "x", "path": "tiny.gguf"}, "bad_request", "path 'tiny.gguf' is not absolute"),
        ({"name": "x", "path": str(tiny_model_path), "options": {"n_ctx": 10}}, "bad_request",
         "models.x.n_ctx: 10 is below the minimum 64"),
        ({"name": "x", "path": str(tiny_model_path), "options": {"n_cxt": 512}}, "bad_request",
         "models.x.n_cxt: unknown key (known: "),
        ({"name": "x", "path": str(tiny_model_path), "options": {"workers": "2"}},
         "bad_request", "models.x.workers: expected int, got str"),
        ({"name": "x y", "path": str(tiny_model_path)}, "bad_request",
         "models.x y: a model name may hold letters, digits"),
        ({"name": "tiny", "path": str(tiny_model_path)}, "model_exists",
         "a model 'tiny' is configured already"),
        ({"name": "x", "path": str(tiny_model_path), "options": {"n_ctx": [1]}}, "bad_request",
         "models.x.n_ctx: expected int, got list"),
        ({"name": "x"}, "bad_request", "op add_model needs field 'path'"),
    ]
    before = _models(d)
    for fields, code, words in cases:
        r = _call(d, "add_model", **fields)
        assert not r["ok"] and r["error"]["code"] == code, (fields, r)
        assert r["error"]["message"].startswith(words), (fields, r["error"]["message"])
    assert _models(d) == before and not _events(d, "model_added")
    # llmctl: exit 1 and the daemon's message
    r = d.llmctl("models", "add", "x", "--path", str(text))
    assert r.returncode == 1 and "not a GGUF file" in r.stderr and "(bad_request)" in r.stderr
    r = d.llmctl("models", "add", "tiny", "--path", str(tiny_model_path), "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["error"]["code"] == "model_exists"
    d.assert_serving()


def test_only_root_adds_and_removes(start_daemon, tiny_model_path):
    sockets = shared_socket_dir()
    try:
        d = start_daemon(tiny_config(tiny_model_path, daemon='socket_mode = "0666"'),
                         socket=sockets / "llm.sock")
        for msg in ({"id": 1, "op": "add_model", "name": "x", "path": str(tiny_model_path)},
                    {"id": 2, "op": "remove_model", "name": "tiny"},
                    {"id": 3, "op": "remove_model", "name": "nope"}):
            r = request_as(65534, d.socket, msg)
            assert not r["ok"] and r["error"]["code"] == "forbidden", r
            assert "needs root (uid 0); this peer is uid 65534" in r["error"]["message"]
        assert list(_models(d)) == ["tiny"]
        d.assert_serving()
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def _answers(d: Daemon) -> bool:
    try:
        d.raw().close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: only a root daemon runs its "
                    "workers as daemon.worker_user, whose reading of the file is checked")
def test_a_file_the_workers_user_cannot_read_is_refused(start_daemon, tiny_model_path):
    """Only the checks: whether the workers then load as nobody depends on the host (here
    the venv's interpreter may sit under /root); the guest suite loads as llm-worker."""
    top = shared_socket_dir()  # a directory anyone may search, for the model files
    try:
        private = top / "private"
        private.mkdir(mode=0o700)
        shutil.copyfile(tiny_model_path, private / "m.gguf")
        closed = top / "closed.gguf"
        shutil.copyfile(tiny_model_path, closed)
        closed.chmod(0o600)
        d = start_daemon(tiny_config(tiny_model_path, daemon='worker_user = "nobody"'),
                         wait=False)
        wait_for(lambda: _answers(d), timeout=60, what="the daemon to answer")
        r = _call(d, "add_model", name="x", path=str(private / "m.gguf"))
        assert r["error"] == {"code": "bad_request", "message": (
            f"not readable by the workers' user 'nobody': directory {private} (mode "
            "drwx------, owner 0:0) may not be searched by uid 65534 gid 65534")}
        r = _call(d, "add_model", name="x", path=str(closed))
        assert r["error"]["code"] == "bad_request" and r["error"]["message"].endswith(
            f"{closed} (mode -rw-------, owner 0:0) may not be read by uid 65534 gid 65534")
        assert list(_models(d)) == ["tiny"]
        closed.chmod(0o644)  # now nobody may read it
        r = _call(d, "add_model", name="x", path=str(closed))
        assert r["ok"] and r["model"]["name"] == "x", r
        assert list(_models(d)) == ["tiny", "x"]
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_remove_drains_a_running_request(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096))
    r = d.llmctl("models", "add", "extra", "--path", str(tiny_model_path), "--n-ctx", "4096",
                 "--parallel", "1", "--threads", "1")
    assert r.returncode == 0, r.stderr
    _ready(d, "extra")
    (pid,) = [w["pid"] for w in d.status()["workers"] if w["model"] == "extra"]
    sock = d.raw()
    running = submit_raw(sock, "r", model="extra", **LONG)
    assert recv_frame(sock)["event"] == "token"
    queued = submit_raw(sock, "q", model="extra", max_tokens=3, ignore_eos=True)
    r = d.llmctl("models", "remove", "extra")
    assert r.returncode == 0 and r.stdout == "removed extra (2 requests finishing first)\n", r
    assert _models(d)["extra"]["state"] == "draining"
    with d.client() as c, pytest.raises(LlmctlError) as exc:
        c.submit("more", model="extra")
    assert exc.value.code == "no_such_model"
    frames = read_until_done(sock, 2)
    ends = {f["request"]: f for f in frames if f.get("event") in ("done", "error")}
    assert ends[running]["event"] == "done" and ends[queued]["event"] == "done", ends
    assert ends[running]["stats"]["completion_tokens"] == LONG["max_tokens"]
    wait_for(lambda: "extra" not in _models(d), timeout=30, what="extra dropped")
    # dropped once its workers were retired: the process is gone
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert [e["model"] for e in _events(d, "model_removed")] == ["extra"]
    # Errors: an unknown name, the only model left
    assert d.llmctl("models", "remove", "nope").returncode == 1
    r = _call(d, "remove_model", name="tiny")
    assert r["error"]["code"] == "bad_request" and "the only model" in r["error"]["message"]
    d.assert_serving()


def _reload(d: Daemon, config: str | None = None) -> dict:
    before = (d.status()["daemon"].get("reload") or {}).get("at", 0)
    if config is not None:
        d.config.write_text(config)
    d.proc.send_signal(signal.SIGHUP)
    return wait_for(lambda: (r := d.status()["daemon"].get("reload")) and r["at"] > before and r,
                    timeout=30, what="the reload")


def test_a_reload_keeps_models_added_and_removed_at_run_time(start_daemon, tiny_model_path):
    filed = f'\n[models.filed]\npath = "{tiny_model_path}"\nn_ctx = 256\nthreads = 1\n'
    d = start_daemon(tiny_config(tiny_model_path) + filed)
    assert d.llmctl("models", "add", "extra", "--path", str(tiny_model_path), "--n-ctx",
                    "512").returncode == 0
    assert d.llmctl("models", "remove", "filed").returncode == 0
    _ready(d, "extra")
    wait_for(lambda: "filed" not in _models(d), timeout=30, what="filed dropped")
    pids = {w["name"]: w["pid"] for w in d.status()["workers"]}

    r = _reload(d)  # the same file: nothing changes
    assert r["result"] == "ok" and r["added"] == r["removed"] == r["changed"] == [], r
    assert list(_models(d)) == ["tiny", "extra"]
    assert {w["name"]: w["pid"] for w in d.status()["workers"]} == pids  # none restarted
    assert _submit_text(d, "extra")["model"] == "extra"

    # The file now has a model "extra": its settings win, and the reload says so.
    r = _reload(d, tiny_config(tiny_model_path) + filed
                + f'\n[models.extra]\npath = "{tiny_model_path}"\nn_ctx = 1024\nthreads = 1\n')
    assert r["result"] == "ok" and r["changed"] == ["extra"] and r["added"] == [], r
    assert "filed" not in _models(d)  # removed at run time: stays removed
    wait_for(lambda: _models(d)["extra"]["n_ctx"] == 1024, timeout=30, what="the file's n_ctx")
    assert [e["model"] for e in _events(d, "runtime_model_replaced")] == ["extra"]
    _ready(d, "extra")
    assert _submit_text(d, "extra")["model"] == "extra"

    # From then on the file owns "extra": a file without it removes it.
    r = _reload(d, tiny_config(tiny_model_path) + filed)
    assert r["result"] == "ok" and r["removed"] == ["extra"], r
    # `models add` brings a removed name back, and later reloads keep it.
    assert d.llmctl("models", "add", "filed", "--path", str(tiny_model_path)).returncode == 0
    r = _reload(d)
    assert r["result"] == "ok" and r["added"] == [] and r["removed"] == [], r
    _ready(d, "filed")
    assert _submit_text(d, "filed")["model"] == "filed"
