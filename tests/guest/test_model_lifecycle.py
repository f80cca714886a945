"""Models come and go under real memory limits and real memory pressure (issue 15).

Two models that do not fit the slice's memory.max together take turns: each load evicts
the other, and the kernel never OOM-kills (llm.slice's memory.events). A memory hog outside
llm.slice raises the system's memory pressure: the daemon unloads the idle model, and the
busy model's worker is not throttled (its scope's memory.events, PSI).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from guestlib import CGROUP, MODEL_SRC, SLICE, GuestDaemon, keyed, sh, wait_for


def log(msg: str) -> None:
    print(f"[{time.monotonic():9.2f}] {msg}", flush=True)


def two_models(daemon: str = "", second: str = "") -> str:
    return f"""
[daemon]
{daemon}
[models.a]
path = "{MODEL_SRC}"
n_ctx = 2048
parallel = 1
threads = 1
max_tokens = 8
[models.b]
path = "{MODEL_SRC}"
n_ctx = 2048
parallel = 1
threads = 1
max_tokens = 8
{second}
"""


def run(d: GuestDaemon, model: str) -> dict:
    from llmctl.client import Client

    with Client(d.socket, timeout=300) as c:
        events = list(c.submit("hello", model=model, max_tokens=4).events())
    assert events[-1]["event"] == "done", events
    return events[-1]["stats"]


def loaded(d: GuestDaemon) -> dict[str, dict]:
    return {m["name"]: m for m in d.call("ps")["models"]}


def lifecycle_events(d: GuestDaemon) -> list[dict]:
    return [e for e in d.call("events", limit=500)["events"] if e["policy"] == "lifecycle"]


def test_two_models_that_do_not_fit_the_slice_together_take_turns_without_an_oom_kill(
        tmp_path: Path) -> None:
    d = GuestDaemon(tmp_path / "d", two_models()).start()
    slice_dir = CGROUP / SLICE
    try:
        run(d, "b")  # a loaded at start, b on demand: both in memory
        # What the daemon counts for one model (its estimate or its measure, the larger)
        # and what both really take: a limit between them fits one, not the two.
        size = max(max(m["memory_bytes"], m["estimate_bytes"]) for m in loaded(d).values())
        both = int((slice_dir / "memory.current").read_text())
        stat = keyed(slice_dir / "memory.stat")
        log(f"one model counts {size}; both take {both} (anon {stat['anon']}, file {stat['file']})")
        assert size < both
        limit = (size + both) // 2 // 4096 * 4096
        d.call("unload", model="a")
        sh("systemctl", "set-property", "--runtime", SLICE, f"MemoryMax={limit}")
        assert int((slice_dir / "memory.max").read_text()) == limit
        before = keyed(slice_dir / "memory.events")
        for model in ("a", "b", "a", "b", "a"):
            stats = run(d, model)
            now = loaded(d)
            log(f"{model}: cold {stats['cold']}, load_s {stats['load_s']}, loaded {sorted(now)}, "
                f"slice memory.current {(slice_dir / 'memory.current').read_text().strip()}")
            assert stats["cold"] is True and sorted(now) == [model]
        after = keyed(slice_dir / "memory.events")
        log(f"llm.slice memory.events before {before} after {after}")
        assert after["oom_kill"] == before["oom_kill"] and after["oom"] == before["oom"]
        evictions = [e for e in lifecycle_events(d) if e["action"] == "evict"]
        assert len(evictions) == 5, evictions
        assert all("to make room for" in e["reason"] and "llm.slice memory.max" in e["reason"]
                   for e in evictions), evictions
        assert all(w["restarts"] == 0 for w in d.status()["workers"])
    finally:
        sh("systemctl", "set-property", "--runtime", SLICE, "MemoryMax=infinity", check=False)
        d.stop()


HOG = """
import sys, time
chunks = []
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    chunks.append(bytearray(8 << 20))  # touched: zero-filled pages
    if len(chunks) > 48:  # 384 MiB under a 64 MiB memory.high: throttled, reclaiming
        chunks.pop(0)
"""


def test_a_memory_hog_outside_the_slice_makes_the_daemon_unload_the_idle_model(
        tmp_path: Path) -> None:
    d = GuestDaemon(tmp_path / "d", two_models(
        daemon='psi_system_trigger = "some 100000 1000000"\npressure_unload_grace = 2',
        second='keep_alive = "1h"')).start()
    hog = None
    try:
        run(d, "b")  # b: loaded on demand, kept an hour, now idle
        assert sorted(loaded(d)) == ["a", "b"]
        a_scope = CGROUP / SLICE / "llm-a-0.scope"
        a_before = keyed(a_scope / "memory.events")
        time.sleep(3)  # past the grace
        # The hog runs in a scope of its own outside llm.slice, held at memory.high, so it
        # stalls in reclaim (memory PSI for the whole system) without an OOM in a 2 GiB guest.
        hog = subprocess.Popen(["systemd-run", "--scope", "--unit", "llmtest-hog", "-p",
                                "MemoryHigh=64M", "-p", "MemorySwapMax=0", sys.executable,
                                "-c", HOG, "120"])
        wait_for(lambda: "b" not in loaded(d), timeout=180,
                 what=lambda: f"b to unload (system memory PSI "
                 f"{Path('/proc/pressure/memory').read_text().split()}, ps {sorted(loaded(d))})")
        evictions = [e for e in lifecycle_events(d) if e["action"] == "evict"]
        log(f"evictions: {evictions}")
        assert evictions and evictions[0]["target"] == "b"
        assert "memory pressure" in evictions[0]["reason"]
        assert "system/memory" in evictions[0]["reason"] or "slice/memory" in evictions[0]["reason"]
        hog_events = keyed(CGROUP / "system.slice" / "llmtest-hog.scope" / "memory.events") \
            if (CGROUP / "system.slice" / "llmtest-hog.scope").exists() else {}
        log(f"hog memory.events {hog_events}; /proc/pressure/memory "
            f"{Path('/proc/pressure/memory').read_text().split()}")
        # a is kept forever: it stays, and its worker was never throttled or reclaimed from.
        assert "a" in loaded(d)
        a_after = keyed(a_scope / "memory.events")
        log(f"a's scope memory.events before {a_before} after {a_after}")
        assert a_after["high"] == a_before["high"] and a_after["max"] == a_before["max"]
        assert a_after["oom_kill"] == 0
        assert run(d, "a")["cold"] is False
    finally:
        if hog is not None:
            sh("systemctl", "stop", "llmtest-hog.scope", check=False)
            hog.wait(30)
        d.stop()
