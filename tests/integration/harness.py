"""Test harness: a real llm-residentd subprocess serving the tiny generated model, and helpers to drive it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llm_residentd.wire.protocol import recv_frame, send_frame
from llmctl import Client
from llmctl.commands.wait import wait_ready

TINY_MODEL = """
[models.tiny]
path = "{path}"
n_ctx = {n_ctx}
workers = {workers}
max_queue = {max_queue}
max_tokens = 16
threads = {threads}
parallel = {parallel}
"""


class Daemon:
    def __init__(self, workdir: Path, config: str | None, socket_path: Path | None = None) -> None:
        """config None runs the daemon without --config (the built-in default)."""
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = socket_path or self.dir / "llm.sock"
        self.config = self.dir / "config.toml"
        if config is not None:
            self.config.write_text(own_state_dir(config, self.dir / "state"))
        self.args = ["--config", str(self.config)] if config is not None else []
        self.logfile = self.dir / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Daemon:
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llm_residentd", *self.args,
                 "--socket", str(self.socket), "--log-format", "json", "--log-level", "debug"],
                stdout=log, stderr=log, env=env)
        if wait:
            wait_ready(str(self.socket), None, 180)
        return self

    def client(self, **kw: Any) -> Client:
        return Client(self.socket, **kw)

    def llmctl(self, *args: str, input: str | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmctl", "--socket", str(self.socket), *args],
                              capture_output=True, text=True, input=input, timeout=timeout)

    def raw(self, hello: bool = True) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(str(self.socket))
        if hello:
            send_frame(sock, {"id": 0, "op": "hello", "protocol": 1})
            assert recv_frame(sock)["ok"] is True
        return sock

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return c.status()

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.logfile.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def assert_serving(self) -> None:
        """A well-formed request still completes."""
        with self.client() as c:
            stream = c.submit("hello there", max_tokens=4)
            events = list(stream.events())
        assert events[-1]["event"] == "done", events


def own_state_dir(config: str, path: Path) -> str:
    """The config with daemon.state_dir set to path unless it sets one: as root the default
    is /var/lib/llm-residentd, and the tests' prompt cache files would meet there."""
    if "state_dir" in config:
        return config
    line = f'state_dir = "{path}"\n'
    if "[daemon]\n" in config:
        return config.replace("[daemon]\n", "[daemon]\n" + line, 1)
    return "[daemon]\n" + line + config


def tiny_config(model: Path, n_ctx: int = 256, workers: int = 1, max_queue: int = 8,
                daemon: str = "", model_extra: str = "", threads: int = 1,
                parallel: int = 1) -> str:
    """model_extra: more lines of [models.tiny]. threads 0 lets the threads policy move
    the count; the default pins 1, so that tests do not depend on the machine's load.
    parallel 1 (one request per worker, not the config's default 4) keeps the tests of
    queueing, priority, fairness and supervision about one request; the slot tests
    (test_slots.py) pass more."""
    body = TINY_MODEL.format(path=model, n_ctx=n_ctx, workers=workers, max_queue=max_queue,
                             threads=threads, parallel=parallel)
    return f"[daemon]\nhello_timeout = 2.0\n{daemon}\n{body}{model_extra}\n"


def running(status: dict[str, Any], worker: int = 0) -> list[str]:
    """The ids of the requests running in a worker's slots, as status lists them."""
    return [r["id"] for r in status["workers"][worker]["requests"]]


def reply(sock: socket.socket, msg_id: str) -> dict[str, Any]:
    """The reply to msg_id on a raw connection; event frames read meanwhile are dropped."""
    while True:
        msg = recv_frame(sock)
        if msg.get("id") == msg_id and "ok" in msg:
            return msg


def submit_raw(sock: socket.socket, msg_id: str, prompt: str = "go", **params: Any) -> str:
    """Submit on a raw connection; the request id once accepted."""
    send_frame(sock, {"id": msg_id, "op": "submit", "prompt": prompt, **params})
    msg = reply(sock, msg_id)
    assert msg["ok"], msg
    return msg["request"]


def read_until_done(sock: socket.socket, want: int) -> list[dict[str, Any]]:
    """Every frame on a raw connection until `want` terminal events have arrived."""
    frames, ended = [], 0
    while ended < want:
        msg = recv_frame(sock)
        assert msg is not None, "connection closed early"
        frames.append(msg)
        if msg.get("event") in ("done", "error"):
            ended += 1
    return frames


OTHER_UID = 65534  # nobody: the uid of connect_as() peers when the tests run as root


def shared_socket_dir() -> Path:
    """A directory that any uid may search, for a daemon that connect_as() peers reach
    (the test's tmp_path is private to its owner). Pair it with socket_mode = "0666"."""
    path = Path(tempfile.mkdtemp(prefix="llm-test-"))
    path.chmod(0o755)
    return path


def connect_as(uid: int, path: Path) -> socket.socket:
    """A connection to path whose peer credentials (SO_PEERCRED) are uid's.

    The daemon reads the credentials of the process that called connect(), so a forked
    child switches to uid, connects and hands the connected socket back (SCM_RIGHTS).
    Needs root unless uid is our own.
    """
    if uid == os.geteuid():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        return sock
    if os.geteuid() != 0:
        raise PermissionError(f"connecting as uid {uid} needs root; the tests run as "
                              f"uid {os.geteuid()}")
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: nothing but the syscalls, then _exit
        status = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(path))
            socket.send_fds(child, [b"x"], [sock.fileno()])
            status = 0
        finally:
            os._exit(status)
    child.close()
    try:
        _, fds, _, _ = socket.recv_fds(parent, 1, 1)
    finally:
        parent.close()
        _, status = os.waitpid(pid, 0)
    assert fds and status == 0, f"the uid {uid} child could not connect to {path}"
    sock = socket.socket(fileno=fds[0])
    sock.settimeout(30)
    return sock


def request_as(uid: int, path: Path, msg: dict[str, Any]) -> dict[str, Any]:
    """The reply to one request sent, after hello, by a peer whose uid is uid."""
    sock = connect_as(uid, path)
    try:
        sock.settimeout(30)
        assert hello(sock)["ok"] is True
        send_frame(sock, msg)
        return recv_frame(sock)
    finally:
        sock.close()


def hello(sock: socket.socket) -> dict[str, Any]:
    send_frame(sock, {"id": 0, "op": "hello", "protocol": 1})
    return recv_frame(sock)


def wait_for(predicate: Any, timeout: float = 10, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
