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
        # The threads policy (on by default) reads the quota from the worker's own cgroup,
        # whichever backend made it.
        assert w["threads"] == 1 and w["threads_why"].startswith("quota: 0.5 CPUs"), w
        d.ctl("limits", "tiny", "--cpu", "200%")
        assert (leaf / "cpu.max").read_text().split() == ["200000", "100000"]
        w = wait_for(lambda: (w := d.worker("tiny-0"))["threads"] == 2 and w, what="threads 2")
        assert w["threads_why"].startswith(("affinity: 2 CPUs", "quota: 2 CPUs")), w
        r = d.ctl("submit", "--json", "-n", "4", "--ignore-eos", "hello")
        assert json.loads(r.stdout.splitlines()[-1])["event"] == "done"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert not Path(root).exists() or not (root / "llm-tiny-0").exists()


def test_systemd_reexec_does_not_break_the_daemon(tmp_path, tiny_model):
    d = GuestDaemon(tmp_path, config(tiny_model, cpu="50%")).start()
    try:
        subprocess.run(["systemctl", "daemon-reexec"], check=True, timeout=300)
        # Calls during the re-exec may fail (reported as scope_error); once systemd is
        # back the same daemon connection works again.
        wait_for(lambda: d.ctl("limits", "tiny", "--cpu", "30%", check=False).returncode == 0,
                 timeout=120, what="limits to apply after the re-exec")
        cgroup = CGROUP / "llm.slice" / "llm-tiny-0.scope"
        assert (cgroup / "cpu.max").read_text().split() == ["30000", "100000"]
        r = d.ctl("submit", "--json", "-n", "4", "--ignore-eos", "hello")
        assert json.loads(r.stdout.splitlines()[-1])["event"] == "done"
    finally:
        d.stop()


def test_scope_stopped_under_the_daemon_gets_a_new_worker_and_scope(tmp_path, tiny_model):
    d = GuestDaemon(tmp_path, config(tiny_model, cpu="50%")).start()
    try:
        old = d.worker("tiny-0")["pid"]
        subprocess.run(["systemctl", "stop", "llm-tiny-0.scope"], check=True, timeout=120)
        w = wait_for(lambda: (w := d.worker("tiny-0"))["state"] == "idle" and w["pid"] != old
                     and w, timeout=120, what="a new worker")
        assert w["unit"] == "llm-tiny-0.scope" and w["restarts"] >= 1
        cgroup = CGROUP / "llm.slice" / "llm-tiny-0.scope"
        assert (cgroup / "cgroup.procs").read_text().split() == [str(w["pid"])]
        assert (cgroup / "cpu.max").read_text().split() == ["50000", "100000"]
        r = d.ctl("submit", "--json", "-n", "4", "--ignore-eos", "hello")
        assert json.loads(r.stdout.splitlines()[-1])["event"] == "done"
    finally:
        d.stop()
