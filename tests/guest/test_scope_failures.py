"""Scopes that cannot be had: the worker serves without limits and the daemon says why."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from guestlib import CGROUP, GuestDaemon, config, wait_for


def test_systemd_refusing_the_scope_leaves_the_worker_serving(tmp_path, tiny_model):
    # systemd refuses a unit in a slice with an invalid name: a real D-Bus error reply.
    cfg = config(tiny_model, cpu="50%").replace("[daemon]", '[daemon]\nslice = "not a slice"')
    d = GuestDaemon(tmp_path, cfg).start()
    try:
        w = d.worker("tiny-0")
        assert w["unit"] is None and "StartTransientUnit failed" in w["scope_error"]
        r = d.ctl("submit", "--json", "-n", "4", "--ignore-eos", "hello")
        assert json.loads(r.stdout.splitlines()[-1])["event"] == "done"
        r = d.ctl("limits", "tiny", "--cpu", "30%", check=False)
        assert r.returncode == 1 and "scope_error" in r.stderr and "no scope" in r.stderr
        assert d.proc.poll() is None  # still running
    finally:
        d.stop()


def test_cgroupfs_backend_in_a_delegated_scope(tmp_path, tiny_model):
    """The daemon in a Delegate=yes scope makes and limits its workers' cgroups itself."""
    (tmp_path / "config.toml").write_text(config(tiny_model, cpu="50%", memory_high="256M"))
    sock = tmp_path / "llm.sock"
    with open(tmp_path / "daemon.log", "ab") as log:
        proc = subprocess.Popen(
            ["systemd-run", "--scope", "--unit", "llmtest-delegated", "-p", "Delegate=yes",
             sys.executable, "-m", "llm_residentd", "--config", str(tmp_path / "config.toml"),
             "--socket", str(sock), "--backend", "cgroupfs", "--log-format", "json"],
            stdout=log, stderr=log)
    d = GuestDaemon.__new__(GuestDaemon)
    d.dir, d.socket, d.proc = tmp_path, sock, proc
    try:
        d.ctl("wait", "--timeout", "240", timeout=260)
        w = d.worker("tiny-0")
        root = CGROUP / "system.slice" / "llmtest-delegated.scope"
        leaf = root / "llm-tiny-0"
        assert w["backend"] == "cgroupfs" and w["cgroup"]["cgroup"] == str(leaf)
        assert str(w["pid"]) in (leaf / "cgroup.procs").read_text().split()
        assert (leaf / "cpu.max").read_text().split() == ["50000", "100000"]
        assert (leaf / "memory.high").read_text().strip() == str(256 << 20)
        assert w["threads"] == 1
        d.ctl("limits", "tiny", "--cpu", "200%")
        assert (leaf / "cpu.max").read_text().split() == ["200000", "100000"]
        assert wait_for(lambda: d.worker("tiny-0")["threads"] == 2, what="threads 2")
        r = d.ctl("submit", "--json", "-n", "4", "--ignore-eos", "hello")
        assert json.loads(r.stdout.splitlines()[-1])["event"] == "done"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert not Path(root).exists() or not (root / "llm-tiny-0").exists()
