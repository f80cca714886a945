"""Helpers for the guest tests: systemd queries and a daemon under real systemd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

MODEL_SRC = Path(os.environ.get("LLM_TEST_MODEL", "/share/tiny.gguf"))
CGROUP = Path("/sys/fs/cgroup")
SLICE = "llm.slice"


def sh(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


def show(unit: str, *props: str) -> dict[str, str]:
    out = sh("systemctl", "show", unit, "-p", ",".join(props), check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def llm_scopes() -> list[str]:
    out = sh("systemctl", "list-units", "--all", "--plain", "--no-legend", "llm-*.scope").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()
            and show(line.split()[0], "ActiveState")["ActiveState"] == "active"]


def keyed(path: Path) -> dict[str, int]:
    """'key value' lines of a cgroup file (cpu.stat, memory.events, memory.stat)."""
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def wait_for(predicate, timeout: float = 60, what: str | Callable[[], str] = "condition"):
    """Poll predicate until it is truthy; what (or what() at the end) names it on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for "
                         f"{what() if callable(what) else what}")


class GuestDaemon:
    def __init__(self, workdir: Path, config: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir = workdir
        self.socket = workdir / "llm.sock"
        (workdir / "config.toml").write_text(config)
        self.proc: subprocess.Popen | None = None

    def start(self) -> GuestDaemon:
        with open(self.dir / "daemon.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llm_residentd", "--config", str(self.dir / "config.toml"),
                 "--socket", str(self.socket), "--backend", "systemd", "--log-format", "json"],
                stdout=log, stderr=log)
        self.ctl("wait", "--timeout", "240", timeout=260)
        return self

    def ctl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "llmctl", "--socket", str(self.socket), *args],
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"llmctl {' '.join(args)} failed ({r.returncode}): {r.stderr}"
                                 f"\n--- daemon log tail:\n{self.log_tail()}")
        return r

    def call(self, op: str, **args: object) -> dict:
        """One op through the client library in this process. Polling with a new llmctl
        process each time would keep a guest CPU busy under TCG (seconds of start-up),
        a neighbour the threads policy rightly yields to."""
        # Imported here: test_package.py's guest has no llmctl until it installs the .deb.
        from llmctl.client import Client

        with Client(self.socket, timeout=120) as c:
            return c.call(op, **args)

    def status(self) -> dict:
        return self.call("status")

    def worker(self, name: str) -> dict:
        return next(w for w in self.status()["workers"] if w["name"] == name)

    def log_tail(self) -> str:
        return (self.dir / "daemon.log").read_text()[-3000:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)


def config(model: Path, **model_keys: str) -> str:
    extra = "".join(f'{k} = "{v}"\n' for k, v in model_keys.items())
    return f"""
[daemon]
psi_scope_trigger = "some 50000 1000000"
[models.tiny]
path = "{model}"
n_ctx = 512
workers = 1
threads = 0
{extra}"""
