"""The daemon under real systemd (run inside the guest as root): scopes, live limits, PSI.

Every check reads what systemd or the kernel reports (systemctl show, cgroup files),
not only the daemon's own word.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from guestlib import CGROUP, MODEL_SRC, SLICE, GuestDaemon, config, llm_scopes, show, wait_for


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    assert MODEL_SRC.exists(), f"the host should have staged a tiny model at {MODEL_SRC}"
    dst = Path("/dev/shm") / MODEL_SRC.name  # not over 9p: loading from there is slow
    shutil.copy(MODEL_SRC, dst)
    return dst


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model) -> GuestDaemon:
    d = GuestDaemon(tmp_path_factory.mktemp("d"), config(model, cpu="150%", memory_high="512M"))
    d.start()
    yield d
    d.stop()
    wait_for(lambda: not llm_scopes(), timeout=30, what="scopes gone after stop")


def test_worker_runs_in_its_scope_with_the_configured_limits(daemon):
    w = daemon.worker("tiny-0")
    assert w["backend"] == "systemd" and w["unit"] == "llm-tiny-0.scope"
    props = show("llm-tiny-0.scope", "ActiveState", "Slice", "CPUQuotaPerSecUSec", "MemoryHigh",
                 "CPUWeight")
    assert props["ActiveState"] == "active" and props["Slice"] == SLICE
    assert props["CPUQuotaPerSecUSec"] in ("1.500000s", "1s 500ms", "1.5s"), props
    assert props["MemoryHigh"] == str(512 << 20)
    assert props["CPUWeight"] == "100"
    cgroup = CGROUP / SLICE / "llm-tiny-0.scope"
    assert (cgroup / "cpu.max").read_text().split() == ["150000", "100000"]
    assert (cgroup / "memory.high").read_text().strip() == str(512 << 20)
    assert str(w["pid"]) in (cgroup / "cgroup.procs").read_text().split()
    assert w["cgroup"]["cgroup"] == str(cgroup)
    assert w["threads"] == 1  # 1.5 CPUs of quota: one whole CPU, one thread


def test_prompt_streams_from_the_worker_in_its_scope(daemon):
    r = daemon.ctl("submit", "--json", "-n", "8", "--ignore-eos", "hello world")
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["stats"]["completion_tokens"] == 8
    assert any(e["event"] == "token" for e in events)


def test_limits_change_live_and_threads_follow(daemon):
    cgroup = CGROUP / SLICE / "llm-tiny-0.scope"
    t0 = time.monotonic()
    daemon.ctl("limits", "tiny", "--cpu", "200%", "--memory-high", "300M")
    # The reply comes after the daemon read the values back from the cgroup.
    assert (cgroup / "cpu.max").read_text().split() == ["200000", "100000"]
    assert (cgroup / "memory.high").read_text().strip() == str(300 << 20)
    assert show("llm-tiny-0.scope", "MemoryHigh")["MemoryHigh"] == str(300 << 20)
    assert time.monotonic() - t0 < 15  # llmctl start-up under TCG dominates this
    def now() -> str:
        w = daemon.worker("tiny-0")
        return f"(now {w['threads']}: {w['threads_why']}; cpu view {daemon.status()['cpu']})"

    assert wait_for(lambda: daemon.worker("tiny-0")["threads"] == 2,
                    what=lambda: f"threads 2 {now()}")
    daemon.ctl("limits", "tiny", "--cpu", "50%")
    assert (cgroup / "cpu.max").read_text().split() == ["50000", "100000"]
    assert wait_for(lambda: daemon.worker("tiny-0")["threads"] == 1,
                    what=lambda: f"threads 1 {now()}")
    daemon.ctl("limits", "tiny", "--cpu", "max")
    assert (cgroup / "cpu.max").read_text().split()[0] == "max"  # CPUWeight keeps it honest
    daemon.ctl("limits", "tiny", "--cpu", "150%", "--memory-high", "512M")


def test_bad_limits_change_nothing(daemon):
    before = (CGROUP / SLICE / "llm-tiny-0.scope" / "cpu.max").read_text()
    for args in (["--cpu", "0%"], ["--memory-high", "1K"], ["--cpu", "abc"]):
        r = daemon.ctl("limits", "tiny", *args, check=False)
        assert r.returncode == 1 and "bad_request" in r.stderr
    assert (CGROUP / SLICE / "llm-tiny-0.scope" / "cpu.max").read_text() == before


def test_cpu_hog_in_the_scope_fires_its_cpu_pressure_trigger(daemon):
    daemon.ctl("limits", "tiny", "--cpu", "20%")
    cgroup = CGROUP / SLICE / "llm-tiny-0.scope"
    before = _trigger_count(daemon, "tiny-0/cpu")
    hog = _hog_in(cgroup, "--cpu", "2", "--timeout", "30s")
    try:
        wait_for(lambda: _trigger_count(daemon, "tiny-0/cpu") > before, timeout=40,
                 what="a cpu.pressure trigger event in status")
    finally:
        hog.kill()
        hog.wait()
        daemon.ctl("limits", "tiny", "--cpu", "150%")
    st = daemon.status()  # one snapshot: a trigger may still fire between two status calls
    w = next(w for w in st["workers"] if w["name"] == "tiny-0")
    assert w["pressure_events"] >= st["pressure"]["triggers"].get("tiny-0/cpu", 0) > before
    stat = daemon.worker("tiny-0")["cgroup"]["cpu.stat"]
    assert stat["nr_throttled"] > 0 and stat["throttled_usec"] > 0


def _hog_in(cgroup: Path, *args: str) -> subprocess.Popen:
    """stress-ng started inside the scope: the shell moves itself in, then execs.

    The test does this; the daemon itself never writes into systemd's cgroups.
    """
    cmd = f"echo $$ > {cgroup}/cgroup.procs && exec stress-ng --quiet {' '.join(args)}"
    return subprocess.Popen(["sh", "-c", cmd])


def _trigger_count(daemon: GuestDaemon, key: str) -> int:
    return daemon.status()["pressure"]["triggers"].get(key, 0)


def test_memory_hog_in_the_scope_fires_its_memory_trigger(daemon):
    daemon.ctl("limits", "tiny", "--memory-high", "64M")
    cgroup = CGROUP / SLICE / "llm-tiny-0.scope"
    before = _trigger_count(daemon, "tiny-0/memory")
    hog = _hog_in(cgroup, "--vm", "1", "--vm-bytes", "256M", "--timeout", "40s")
    try:
        wait_for(lambda: _trigger_count(daemon, "tiny-0/memory") > before, timeout=50,
                 what="a memory.pressure trigger event")
    finally:
        hog.kill()
        hog.wait()
        daemon.ctl("limits", "tiny", "--memory-high", "512M")
    assert daemon.worker("tiny-0")["cgroup"]["memory.events"]["high"] > 0


def test_killed_worker_gets_a_new_scope(daemon):
    old = daemon.worker("tiny-0")["pid"]
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: (w := daemon.worker("tiny-0"))["state"] == "idle"
                   and w["pid"] != old and w, timeout=120, what="restarted worker")
    cgroup = CGROUP / SLICE / "llm-tiny-0.scope"
    assert str(new["pid"]) in (cgroup / "cgroup.procs").read_text().split()
    assert str(old) not in (cgroup / "cgroup.procs").read_text().split()
    assert llm_scopes() == ["llm-tiny-0.scope"]
