"""sd_notify, socket activation and the workers' user: what the Debian units rely on."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from llm_residentd import notify, paths
from llm_residentd.catalog import config
from llm_residentd.catalog.config import ConfigError
from llm_residentd.core.workers import LoadFailed, Worker
from llm_residentd.front.server import activated_socket
from llm_residentd.main import run
from llm_residentd.placement.users import run_as

NOBODY = "nobody"


def _receiver(path: Path | str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    return sock


# -- sd_notify -----------------------------------------------------------------------------

def test_notify_sends_a_datagram_to_a_path_socket(tmp_path):
    with _receiver(tmp_path / "notify") as recv:
        assert notify.notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert recv.recv(4096) == b"READY=1\nSTATUS=up"


def test_notify_supports_abstract_addresses():
    name = f"llm-residentd-test-{os.getpid()}"
    with _receiver("\0" + name) as recv:
        assert notify.notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert recv.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative"},
                                 {"NOTIFY_SOCKET": "/nonexistent/notify"}])
def test_notify_without_a_usable_socket_is_a_no_op(env):
    assert notify.notify("READY=1", env) is False


@pytest.mark.parametrize("env, interval", [
    ({}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec(env, interval):
    assert notify.watchdog_interval(env) == interval


def test_run_loop_reports_ready_status_watchdog_and_stopping(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    cfg = config.parse({"daemon": {"backend": "none", "psi_system_trigger": "",
                                   "psi_scope_trigger": "", "state_dir": str(tmp_path)},
                        "models": {"m": {"path": str(tmp_path / "absent.gguf")}}}, "test")
    recv = _receiver(tmp_path / "notify")
    recv.setblocking(False)

    async def scenario() -> tuple[int, list[str]]:
        loop = asyncio.get_running_loop()
        daemon = asyncio.create_task(run(cfg, tmp_path / "llm.sock"))
        got: list[str] = []
        async with asyncio.timeout(10):
            while not (any("WATCHDOG=1" in m for m in got)
                       and any("m unavailable" in m for m in got)):
                got.append((await loop.sock_recv(recv, 4096)).decode())
            assert (tmp_path / "llm.sock").is_socket()
            os.kill(os.getpid(), signal.SIGTERM)
            code = await daemon
        got.append((await loop.sock_recv(recv, 4096)).decode())
        return code, got

    code, got = asyncio.run(scenario())
    recv.close()
    assert code == 0
    assert got[0] == "READY=1\nSTATUS=models: m loading"
    assert "STATUS=models: m unavailable" in got
    assert got[-1].startswith("STOPPING=1")
    assert not (tmp_path / "llm.sock").exists()


def test_sighup_reports_reloading_then_ready_and_a_refused_file_keeps_the_daemon(
        tmp_path, monkeypatch):
    """systemctl reload: RELOADING=1 with MONOTONIC_USEC, then READY=1, for a refused file
    too; the daemon goes on serving (it used to die of SIGHUP)."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    cfg = config.parse({"daemon": {"backend": "none", "psi_system_trigger": "",
                                   "psi_scope_trigger": "", "state_dir": str(tmp_path)},
                        "models": {"m": {"path": str(tmp_path / "absent.gguf")}}}, "test")
    loads = iter([ConfigError("models.m.n_ctx: expected int, got str"), cfg])

    def load() -> config.Config:
        got = next(loads)
        if isinstance(got, Exception):
            raise got
        return got

    recv = _receiver(tmp_path / "notify")
    recv.setblocking(False)

    async def scenario() -> tuple[int, list[str], bool]:
        loop = asyncio.get_running_loop()
        daemon = asyncio.create_task(run(cfg, tmp_path / "llm.sock", load=load))
        got: list[str] = []
        async with asyncio.timeout(10):
            got.append((await loop.sock_recv(recv, 4096)).decode())  # READY=1 at start
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGHUP)
                got.append((await loop.sock_recv(recv, 4096)).decode())
                got.append((await loop.sock_recv(recv, 4096)).decode())
            alive = not daemon.done()
            os.kill(os.getpid(), signal.SIGTERM)
            code = await daemon
        return code, got, alive

    code, got, alive = asyncio.run(scenario())
    recv.close()
    assert alive and code == 0
    assert got[0].startswith("READY=1")
    for reloading, ready in (got[1:3], got[3:5]):
        lines = reloading.split("\n")
        assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
        usec = int(lines[1].split("=")[1])
        assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 10_000_000
        assert ready.startswith("READY=1\nSTATUS=models: m")


# -- socket activation -------------------------------------------------------------------

def test_activation_needs_this_pid_and_fds():
    assert activated_socket({}) is None
    assert activated_socket({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) is None
    assert activated_socket({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) is None


ACTIVATED = textwrap.dedent("""
    import asyncio, os, socket, sys, types
    from llm_residentd.catalog import config
    from llm_residentd.front.server import Server, activated_socket

    path = sys.argv[1]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    os.chmod(path, 0o640)
    fd = listener.detach()
    if fd != 3:  # systemd hands the socket over as fd 3, SD_LISTEN_FDS_START
        os.dup2(fd, 3)
        os.close(fd)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="llm.sock")
    sock = activated_socket()
    assert sock is not None and sock.fileno() == 3 and not os.get_inheritable(3)
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)

    async def main():
        service = types.SimpleNamespace(config=config.default_config())
        server = Server(service, None, sock)
        await server.start()
        reader, writer = await asyncio.open_unix_connection(path)
        writer.close()
        await server.stop_listening()
        await server.close_connections()

    asyncio.run(main())
    print(oct(os.stat(path).st_mode & 0o777))
""")


def test_activated_socket_is_used_and_left_in_place(tmp_path):
    sock_path = tmp_path / "llm.sock"
    out = subprocess.run([sys.executable, "-c", ACTIVATED, str(sock_path)], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": _pythonpath()})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0o640"  # not chmod-ed by the daemon
    assert sock_path.is_socket()  # not unlinked on stop


def _pythonpath() -> str:
    """Where the test process found llm_residentd, first, for the child processes."""
    import llm_residentd
    found = str(Path(llm_residentd.__file__).parent.parent)
    return os.pathsep.join(p for p in (found, os.environ.get("PYTHONPATH")) if p)


# -- the workers' user -------------------------------------------------------------------

def test_worker_user_must_exist():
    with pytest.raises(ConfigError, match=r"daemon.worker_user: no user 'no-such-user-xyz'"):
        config.parse({"daemon": {"worker_user": "no-such-user-xyz"},
                      "models": {"m": {"path": "/m.gguf"}}}, "test")
    cfg = config.parse({"daemon": {"worker_user": NOBODY}, "models": {"m": {"path": "/m"}}}, "t")
    assert cfg.daemon.worker_user == NOBODY


def test_run_as_switches_only_from_root(monkeypatch):
    assert run_as("") == {}
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run_as(NOBODY) == {}
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    pw = pwd.getpwnam(NOBODY)
    creds = run_as(NOBODY)
    assert (creds["user"], creds["group"], creds["extra_groups"]) == (pw.pw_uid, pw.pw_gid, [])
    assert creds["env"]["HOME"] == pw.pw_dir and creds["env"]["USER"] == NOBODY
    assert run_as("root") == {}
    with pytest.raises(KeyError):
        run_as("no-such-user-xyz")


class _Listener:
    def __init__(self, path: Path) -> None:
        self.path = path

    async def model_path(self, model: str) -> Path:
        return self.path

    async def place(self, worker: Worker) -> None:
        pass


def _spawn(user: str, model: Path) -> str:
    worker = Worker(config.ModelConfig(name="m", path=str(model)), 0, _Listener(model), 1.0, user)

    async def go() -> str:
        try:
            await worker._spawn_and_load()
        except LoadFailed as exc:
            return str(exc)
        finally:
            await worker._reap()
        return "loaded"

    return asyncio.run(go())


def test_unknown_worker_user_fails_the_load(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert _spawn("no-such-user-xyz", tmp_path / "m.gguf") == \
        "daemon.worker_user: no user 'no-such-user-xyz'"


# -- clients -------------------------------------------------------------------------------

def test_client_falls_back_to_the_system_socket(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.SOCKET_ENV, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "user"))
    system = tmp_path / "llm.sock"
    monkeypatch.setattr(paths, "SYSTEM_SOCKET", system)
    assert paths.client_socket() == tmp_path / "user" / "llm-residentd.sock"  # neither exists
    system.touch()
    assert paths.client_socket() == system  # a group-llm member without a daemon of their own
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "llm-residentd.sock").touch()
    assert paths.client_socket() == tmp_path / "user" / "llm-residentd.sock"
    monkeypatch.setenv(paths.SOCKET_ENV, "/x.sock")
    assert paths.client_socket() == Path("/x.sock")
