"""The threads policy under real systemd, with real PSI triggers (run in the guest as root).

Two models serve the same GGUF from their own scopes: `auto` (threads = 0, the policy
moves its count) and `pinned` (threads = 2). Quiet, both decode alike: the control. Then
two CPU hogs start outside llm.slice: the CPU PSI trigger fires, the daemon reads the load
at once, and `auto` gives up a thread; the kernel shows it in /proc/<pid>/task (one
thread accrues CPU time, not two). Beside the hogs, `auto` decodes faster than `pinned`
in the same run. After the hogs stop, the thread comes back.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guestlib import CGROUP, SLICE, GuestDaemon, llm_scopes, wait_for
from llmctl.client import Client

TOKENS = 96


def log(msg: str) -> None:
    print(f"[{time.monotonic():9.2f}] {msg}", flush=True)


@pytest.fixture(scope="module")
def wide_model(share: Path) -> Iterator[Path]:
    """A synthetic model wide enough that compute, not Python, fills a token (staged by
    tests/vm/test_guest_suite.py), copied to /dev/shm."""
    src = share / "wide.gguf"
    assert src.is_file(), f"{src} missing: the host stages it (tests/vm/test_guest_suite.py)"
    dst = Path("/dev/shm") / src.name
    shutil.copyfile(src, dst)
    yield dst
    dst.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, wide_model) -> Iterator[GuestDaemon]:
    models = "".join(f"""
[models.{name}]
path = "{wide_model}"
n_ctx = 1024
max_tokens = {TOKENS}
threads = {threads}
load = "at_start"
""" for name, threads in (("auto", 0), ("pinned", 2)))
    d = GuestDaemon(tmp_path_factory.mktemp("threads"), models).start()
    yield d
    d.stop()
    wait_for(lambda: not llm_scopes(), timeout=30, what="scopes gone after stop")


def decode(d: GuestDaemon, model: str) -> float:
    """One request's decode tokens/s as the worker measured it."""
    with Client(d.socket, timeout=300) as c:
        stream = c.submit("the river flows", model=model, max_tokens=TOKENS, ignore_eos=True,
                          raw=True, temperature=0.0)
        events = list(stream.events())
    assert events[-1]["event"] == "done", events[-1]
    return events[-1]["stats"]["tokens_per_s"]


def task_cpu(pid: int) -> dict[str, int]:
    """utime + stime (ticks) of each thread of a process."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out[task.name] = int(fields[11]) + int(fields[12])
    return out


def computing_threads(d: GuestDaemon, pid: int, model: str) -> int:
    """Threads of the worker that took at least a fifth of its busiest thread's CPU time
    while it decoded one request."""
    before = task_cpu(pid)
    decode(d, model)
    after = task_cpu(pid)
    used = [after[t] - before.get(t, 0) for t in after]
    return sum(1 for u in used if u >= max(used) / 5)


def threads_events(d: GuestDaemon) -> list[dict[str, Any]]:
    return [e for e in d.call("events", limit=500)["events"] if e["action"] == "set_threads"]


def changes_since(d: GuestDaemon, n: int) -> list[tuple[str, int, str]]:
    return [(e["target"], e["values"]["threads"], e["reason"]) for e in threads_events(d)[n:]]


def settled(d: GuestDaemon, name: str, threads: int) -> dict[str, Any]:
    """Wait, polling gently (TCG: every client costs CPU), for a worker's count."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        w = d.worker(name)
        if w["threads"] == threads and not w["threads_asked"]:
            return w
        time.sleep(2)
    raise AssertionError(f"{name}: {w['threads']} threads ({w['threads_why']}), not {threads}")


def test_threads_drop_beside_a_hog_outside_the_slice_and_come_back(daemon):
    d = daemon
    cpu = d.status()["cpu"]
    assert cpu["mode"] == "psi-trigger", cpu  # real triggers here, not polling
    assert cpu["trigger"] == "some 50000 500000" and cpu["why_polling"] is None
    auto = settled(d, "auto-0", 2)
    assert auto["threads_why"].startswith("affinity: 2 CPUs")
    assert settled(d, "pinned-0", 2)["threads_why"] == "config: threads = 2"

    # Control: quiet, the two workers run the same model alike. (In TCG the daemon's relay
    # and this test's client cost enough CPU that `auto` may yield a thread to them.)
    quiet = {m: [decode(d, m) for _ in range(2)] for m in ("auto", "pinned")}
    log(f"quiet tok/s {quiet}; thread changes {changes_since(d, 0)}")
    settled(d, "auto-0", 2)
    before = len(threads_events(d))
    triggers0 = cpu["triggers"]

    started = time.time()
    hog = subprocess.Popen(["stress-ng", "--quiet", "--cpu", "2", "--timeout", "600s"])
    try:
        hog_cgroup = Path(f"/proc/{hog.pid}/cgroup").read_text()
        assert SLICE not in hog_cgroup, hog_cgroup
        w = settled(d, "auto-0", 1)
        assert w["threads_why"].startswith("contention: "), w
        (event,) = threads_events(d)[before:]
        reaction = event["at"] - started
        cpu = d.status()["cpu"]
        log(f"dropped to 1 thread {reaction:.3f} s after the hog started: {event['reason']}; "
            f"cpu {cpu}")
        assert cpu["triggers"] > triggers0, "no CPU PSI trigger fired under the hog"
        assert reaction < 30, reaction  # bench/threads_reaction.py measures it properly
        # the kernel's view of the drop, with the pinned worker as the measure's control
        pinned_pid = d.worker("pinned-0")["pid"]
        assert computing_threads(d, pinned_pid, "pinned") == 2
        assert computing_threads(d, w["pid"], "auto") == 1
        # Beside the hog, in the same run: the policy's 1 thread against 2 pinned ones.
        hogged = {m: [] for m in ("auto", "pinned")}
        for _ in range(2):
            for m in ("pinned", "auto"):
                hogged[m].append(decode(d, m))
        log(f"beside the hog tok/s {hogged}; thread changes {changes_since(d, before)}")
        assert d.worker("pinned-0")["threads"] == 2
    finally:
        hog.terminate()
        hog.wait(30)
    stopped = time.monotonic()
    w = settled(d, "auto-0", 2)
    log(f"2 threads again {time.monotonic() - stopped:.1f} s after the hog stopped "
        f"({w['threads_why']})")
    assert w["threads_why"].startswith("affinity: 2 CPUs"), w
    changes = threads_events(d)[before:]
    log(f"thread changes from the hog's start on: {changes_since(d, before)}")
    assert {e["target"] for e in changes} == {"auto-0"}  # never the pinned worker
    assert changes[0]["values"]["threads"] == 1 and changes[-1]["values"]["threads"] == 2
    # The policy's worker recovers: faster than the pinned one beside the hog, while the
    # two were alike when quiet (the control).
    assert min(hogged["auto"]) > max(hogged["pinned"]) * 1.2, (hogged, quiet)
    # Quiet, auto may give up a thread to this test's own client (above), so it makes
    # 70-85 % of pinned's rate: compared by their means, not worst against best, which
    # left no room for the emulator's own noise (31.4 against 0.7 x 44.8 in one CI run).
    assert statistics.fmean(quiet["auto"]) > 0.7 * statistics.fmean(quiet["pinned"]), quiet
    scope = CGROUP / SLICE / "llm-auto-0.scope"
    assert str(w["pid"]) in (scope / "cgroup.procs").read_text().split()
