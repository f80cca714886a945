"""The policies against real PSI and real cgroup files (run inside the guest as root).

Each test runs its own daemon with one policy, drives the kernel into the condition the
policy reacts to (a CPU hog outside llm.slice, a worker squeezed by memory.high), and
checks both sides: what the kernel and systemd report (/proc/pressure, the scope's
cgroup files, `systemctl show`) and what the daemon recorded (`events`, `status`,
`policy list`). Thresholds are chosen well apart from the guest's idle noise; waits poll
with generous timeouts, since TCG is slow and another guest may share the host.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guestlib import CGROUP, SLICE, GuestDaemon, config, keyed, llm_scopes, show, wait_for
from llmctl.client import Client, LlmctlError

SCOPE = "llm-tiny-0.scope"
SCOPE_DIR = CGROUP / SLICE / SCOPE
MIB = 1 << 20


def log(msg: str) -> None:
    """Trajectories for the -v output, so a failure shows what the kernel did."""
    print(f"[{time.monotonic():9.2f}] {msg}", flush=True)


# -- kernel side ------------------------------------------------------------------------


def psi(path: Path) -> dict[str, float]:
    """The `some` line of a pressure file: avg10, avg60, avg300, total."""
    line = next(x for x in path.read_text().splitlines() if x.startswith("some "))
    return {k: float(v) for k, v in (f.split("=") for f in line.split()[1:])}


def cpu_avg10() -> float:
    return psi(Path("/proc/pressure/cpu"))["avg10"]


def outside_avg10() -> float:
    """CPU some avg10 of the busiest top-level cgroup other than llm.slice: the programs
    the workers share the machine with (what the pressure policies follow)."""
    return max(psi(top / "cpu.pressure")["avg10"] for top in CGROUP.iterdir()
               if top.name != SLICE and (top / "cpu.pressure").exists())


def reported_outside(d) -> float:
    """The same figure as the daemon's status reports it (pressure.outside)."""
    return d.status()["pressure"]["outside"]["cpu"]["some"]["avg10"]


def cpu_max() -> str:
    return (SCOPE_DIR / "cpu.max").read_text().strip()


def memory_high() -> int | None:
    text = (SCOPE_DIR / "memory.high").read_text().strip()
    return None if text == "max" else int(text)


def wait_calm(below: float, timeout: float = 90) -> float:
    """The guest's CPU pressure must settle first (TCG is noisy right after boot)."""
    wait_for(lambda: cpu_avg10() < below, timeout=timeout,
             what=f"system cpu some avg10 < {below} before the test (was {cpu_avg10()})")
    return cpu_avg10()


class CpuHog:
    """stress-ng outside llm.slice (in the test's own cgroup): 4 spinners on 2 vCPUs, so the
    system's CPU `some` pressure goes to ~100 %. With nice 19 the daemon and the test stay
    responsive (the hogs still wait); at nice 0 a busy worker waits too.
    """

    def __init__(self, nice: int = 19, seconds: int = 90) -> None:
        self.proc = subprocess.Popen(["nice", "-n", str(nice), "stress-ng", "--quiet", "--cpu",
                                      "4", "--timeout", f"{seconds}s"])
        self.total0 = psi(Path("/proc/pressure/cpu"))["total"]

    def cgroup(self) -> str:
        text = Path(f"/proc/{self.proc.pid}/cgroup").read_text()
        return next(line[3:] for line in text.splitlines() if line.startswith("0::"))

    def stop(self) -> float:
        """Stop it; returns the system CPU stall (us) it caused meanwhile."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(30)
        return psi(Path("/proc/pressure/cpu"))["total"] - self.total0


# -- daemon side -------------------------------------------------------------------------

class Daemon(GuestDaemon):
    """GuestDaemon, with readiness polled in-process: an llmctl start-up costs seconds in TCG."""

    def start(self) -> Daemon:
        with open(self.dir / "daemon.log", "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llm_residentd", "--config", str(self.dir / "config.toml"),
                 "--socket", str(self.socket), "--backend", "systemd", "--log-format", "json"],
                stdout=out, stderr=out)
        wait_for(self._ready, timeout=240, what="the daemon and its model ready")
        self.client = Client(self.socket, timeout=60)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log_tail()
        try:
            with Client(self.socket, timeout=10) as c:
                state = c.models()[0]["state"]
        except LlmctlError:
            return False
        assert state != "unavailable", self.log_tail()
        return state == "ready"

    def status(self) -> dict[str, Any]:
        return self.client.status()

    def policy(self, name: str, **settings: Any) -> dict[str, Any]:
        """Enable or change a policy live (what `llmctl policy set` does)."""
        return self.client.call("policy", action="set", name=name, settings=settings)

    def actions(self, policy: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.client.call("events", limit=500)["events"]
                if e["policy"] == policy and (kind is None or e["action"] == kind)]

    def triggers(self, suffix: str) -> int:
        """PSI trigger events the daemon counted on keys ending in suffix (e.g. "/cpu")."""
        counts = self.client.status()["pressure"]["triggers"]
        return sum(n for key, n in counts.items() if key.endswith(suffix))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_model) -> Iterator[Daemon]:
    """One daemon for the module (a start costs ~20 s in the guest); each test enables its
    policy live and turns it inert again when done, so the tests also run alone."""
    d = Daemon(tmp_path_factory.mktemp("policies"), config(tiny_model)).start()
    yield d
    d.client.close()
    d.stop()
    wait_for(lambda: not llm_scopes(), timeout=30, what="scopes gone after stop")


class Collector(threading.Thread):
    """One request on its own connection, made up front (a hello under a hog is slow).
    submit() returns at once; the thread sends the request and collects its events, so
    several submissions reach a starved daemon together."""

    def __init__(self, socket: Path) -> None:
        super().__init__(daemon=True)
        self.client = Client(socket, timeout=60)
        self.events: list[dict[str, Any]] = []
        self.request = ""

    def submit(self, prompt: str, **params: Any) -> Collector:
        self.prompt, self.params = prompt, params
        self.start()
        return self

    def run(self) -> None:
        stream = self.client.submit(self.prompt, **self.params)
        self.request = stream.request
        for event in stream.events():
            self.events.append(event)
        self.client.close()

    def last(self, timeout: float) -> dict[str, Any]:
        self.join(timeout)
        assert not self.is_alive(), f"{self.request}: no done/error within {timeout} s"
        return self.events[-1]


class Generator(threading.Thread):
    """Keeps the worker generating, one request after another, until stopped."""

    def __init__(self, socket: Path, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.socket, self.max_tokens = socket, max_tokens
        self.stopping = False
        self.requests: list[str] = []
        self.results: list[dict[str, Any]] = []
        self.start()

    def run(self) -> None:
        with Client(self.socket, timeout=120) as c:
            while not self.stopping:
                stream = c.submit("tell me a story", max_tokens=self.max_tokens, ignore_eos=True)
                self.requests.append(stream.request)
                self.results.append(list(stream.events())[-1])

    def stop(self, timeout: float = 120) -> list[dict[str, Any]]:
        """Stop after the current request; returns every request's last event."""
        self.stopping = True
        self.join(timeout)
        assert not self.is_alive(), f"generator still busy after {timeout} s"
        return self.results


# -- psi-admission -----------------------------------------------------------------------

DEFER_ABOVE, ADMIT_BELOW = 35.0, 25.0


def psi_admission_on(d: Daemon) -> None:
    """keep_running=0: every new request is held (these tests were written before that
    setting, whose default 1 lets one in once the busy request ends)."""
    d.policy("psi-admission", defer_above=DEFER_ABOVE, admit_below=ADMIT_BELOW, calm_s=1.0,
             max_defer_s=300.0, keep_running=0)


def admission_state(d: Daemon) -> str:
    """What the daemon saw and did, for a failure message: a CI run once timed out waiting
    for the defer actions with nothing else to go on."""
    listed = d.client.call("policy", action="list")
    lines = [line for line in d.log_tail().splitlines()
             if "policy" in line or "pressure" in line][-8:]
    return (f"outside cpu avg10 {reported_outside(d)}, system {cpu_avg10()}; deferred "
            f"{listed.get('deferred')}, disabled {listed.get('disabled')}; queued "
            f"{d.client.status()['models']['tiny']['queued']}; psi-admission events "
            f"{d.actions('psi-admission')[-6:]}; log: {lines}")


def psi_admission_off(d: Daemon) -> None:
    d.policy("psi-admission", defer_above=100.0, admit_below=100.0)  # inert from here on


def test_psi_admission_defers_under_cpu_pressure_then_admits_all(daemon):
    """A hog outside llm.slice stalls the system and a busy worker: the system cpu trigger
    fires, the policy defers what comes next; once the hog stops and pressure calms, all run."""
    d = daemon
    psi_admission_on(d)
    busy = None
    try:
        log(f"calm before: avg10 {wait_calm(ADMIT_BELOW - 5)}")
        # Busy before the hog starts, so these requests are admitted whatever pressure follows.
        busy = Generator(d.socket, max_tokens=48)
        wait_for(lambda: d.worker("tiny-0")["state"] == "busy", timeout=30, what="worker busy")
        conns = [Collector(d.socket) for _ in range(4)]
        scope_stall0 = psi(SCOPE_DIR / "cpu.pressure")["total"]
        hog = CpuHog(nice=0)
        try:
            assert SLICE not in hog.cgroup()
            wait_for(lambda: outside_avg10() >= DEFER_ABOVE + 5, timeout=60,
                     what=f"cpu some avg10 outside llm.slice >= {DEFER_ABOVE + 5} under the hog")
            # A /cpu trigger after avg10 passed defer_above: from that event on the policy defers.
            n0 = d.triggers("system/cpu")
            wait_for(lambda: d.triggers("system/cpu") > n0, timeout=30,
                     what="a system cpu pressure trigger event under the hog")
            busy.stopping = True
            log(f"hog: avg10 {cpu_avg10()}, cpu triggers {n0} -> {d.triggers('/cpu')}, "
                f"scope cpu.pressure {psi(SCOPE_DIR / 'cpu.pressure')}")
            reqs = [conns[i].submit(f"hello world {i}", max_tokens=8, ignore_eos=True)
                    for i in range(3)]
            expiring = conns[3].submit("the quick brown fox", max_tokens=8, timeout=3.0)
            wait_for(lambda: all(r.request for r in conns), timeout=60, what="requests accepted")
            ids = {r.request for r in reqs}
            wait_for(lambda: ids | {expiring.request} <= {
                e["target"] for e in d.actions("psi-admission", "defer")}, timeout=30,
                what=lambda: f"defer actions for the new requests ({admission_state(d)})")
            avg10_hog, outside_hog, reported = cpu_avg10(), outside_avg10(), reported_outside(d)
            usage0 = keyed(SCOPE_DIR / "cpu.stat")["usage_usec"]
            scope_stall = psi(SCOPE_DIR / "cpu.pressure")["total"] - scope_stall0
        finally:
            stall = hog.stop()
        log(f"hog stopped at avg10 {avg10_hog} (outside llm.slice {outside_hog}, status "
            f"{reported}); "
            f"{stall / 1e6:.1f} s of system cpu stall")
        # What the kernel saw: the system and the hog's cgroup stalled, and so did the busy
        # worker's scope.
        assert avg10_hog >= DEFER_ABOVE and outside_hog >= DEFER_ABOVE and reported >= DEFER_ABOVE
        assert stall > 1_000_000 and scope_stall > 50_000
        # Pressure takes seconds to calm; meanwhile they stay queued and held back.
        held = d.client.call("policy", action="list")["deferred"]
        queued = d.client.status()["models"]["tiny"]["queued"]
        log(f"deferred {held}, queued {queued}")
        assert ids <= set(held) and ids <= set(queued)
        assert all(e["result"] == "done" and "cpu some avg10" in e["reason"]
                   for e in d.actions("psi-admission", "defer"))
        # The short timeout passes while it is still held back.
        err = expiring.last(60)
        assert err["event"] == "error" and err["error"]["code"] == "deferred_timeout", err
        assert ids <= set(d.client.status()["models"]["tiny"]["queued"])  # the rest wait on
        for r in reqs:
            last = r.last(120)
            assert last["event"] == "done" and last["stats"]["completion_tokens"] == 8, last
        log(f"all admitted and done; avg10 now {cpu_avg10()}")
        assert all(e["event"] == "done" for e in busy.stop())  # no request lost
        for e in d.actions("psi-admission"):
            log(f"action {e['action']} {e['target']} at {e['at']:.1f}: {e['reason']}")
        admits = {e["target"]: e for e in d.actions("psi-admission", "admit")}
        defers = {e["target"]: e for e in d.actions("psi-admission", "defer")}
        for rid in ids:
            assert rid in admits, f"no admit action for {rid}"
            assert "anyway" not in admits[rid]["reason"], admits[rid]  # calm, not max_defer_s
            assert admits[rid]["at"] > defers[rid]["at"]
        assert expiring.request not in admits
        st = d.client.status()
        assert st["models"]["tiny"]["queued"] == []
        assert d.client.call("policy", action="list")["deferred"] == []
        assert st["models"]["tiny"]["outcomes"].get("deferred_timeout") == 1
        # The admitted requests ran in the worker's scope: the kernel charged it the CPU.
        assert keyed(SCOPE_DIR / "cpu.stat")["usage_usec"] > usage0
    finally:
        psi_admission_off(d)
        if busy is not None:
            busy.stop()


def test_psi_admission_ignores_the_workers_own_throttling(daemon):
    """The control for the test above: with no other program running, a worker busy at a
    20 % quota stalls on its own cpu.max, which raises the system's CPU pressure as a hog
    would. The pressure outside llm.slice stays low, and the policy admits every request."""
    d = daemon
    psi_admission_on(d)
    busy = None
    try:
        log(f"calm before: avg10 {wait_calm(ADMIT_BELOW - 5)}")
        d.client.call("limits", model="tiny", cpu="20%")
        throttled0 = keyed(SCOPE_DIR / "cpu.stat")["throttled_usec"]
        busy = Generator(d.socket, max_tokens=48)
        wait_for(lambda: cpu_avg10() >= DEFER_ABOVE + 5, timeout=90,
                 what=f"system cpu some avg10 >= {DEFER_ABOVE + 5} from the throttled worker")
        n0 = d.triggers("system/cpu")
        wait_for(lambda: d.triggers("system/cpu") > n0, timeout=30,
                 what="a system cpu pressure trigger event")
        avg10, outside, reported = cpu_avg10(), outside_avg10(), reported_outside(d)
        log(f"throttled worker alone: system avg10 {avg10}, outside llm.slice {outside} "
            f"(status: {reported})")
        assert outside < ADMIT_BELOW and reported < ADMIT_BELOW
        assert "outside the workers' cgroups: cpu " in d.ctl("status").stdout
        reqs = [Collector(d.socket).submit(f"hello world {i}", max_tokens=4, ignore_eos=True)
                for i in range(2)]
        for r in reqs:
            last = r.last(180)
            assert last["event"] == "done" and last["stats"]["completion_tokens"] == 4, last
        throttled = keyed(SCOPE_DIR / "cpu.stat")["throttled_usec"] - throttled0
        log(f"scope throttled {throttled / 1e6:.1f} s meanwhile; system avg10 {cpu_avg10()}")
        assert throttled > 1_000_000  # the kernel did throttle it: the pressure was its own
        defers = {e["target"] for e in d.actions("psi-admission", "defer")}
        assert not ({r.request for r in reqs} | set(busy.requests)) & defers
    finally:
        psi_admission_off(d)
        if busy is not None:
            busy.stop()
        d.client.call("limits", model="tiny", cpu="max")


def test_system_psi_triggers_are_armed(daemon):
    for line in (daemon.dir / "daemon.log").read_text().splitlines():
        if "psi_trigger_unavailable" in line:
            log(line)
    counts = daemon.client.status()["pressure"]["triggers"]
    assert {"system/cpu", "system/memory", "system/io"} <= set(counts), counts


# -- neighbour-guard ---------------------------------------------------------------------

HIGH, LOW = 35.0, 25.0


def test_neighbour_guard_cuts_the_quota_under_a_hog_and_gives_it_back(daemon):
    d = daemon
    log(f"calm before: avg10 {wait_calm(LOW - 5)}")
    # Enabled while calm: its first decision puts the quota at max_cpu.
    d.policy("neighbour-guard", high=HIGH, low=LOW, decrease=0.5, step=0.25, min_cpu=0.25,
             max_cpu=1.0, interval_s=1.0)
    try:
        wait_for(lambda: cpu_max() == "100000 100000", timeout=30,
                 what="cpu.max at max_cpu (1 CPU)")
        assert show(SCOPE, "CPUQuotaPerSecUSec")["CPUQuotaPerSecUSec"] == "1s"
        seen = [cpu_max()]

        def sample() -> str:
            value = cpu_max()
            if value != seen[-1]:
                seen.append(value)
                log(f"cpu.max {value} (avg10 {cpu_avg10()})")
            return value

        hog = CpuHog(nice=19)
        try:
            wait_for(lambda: sample() == "25000 100000", timeout=60, what="cpu.max cut to min_cpu")
            assert show(SCOPE, "CPUQuotaPerSecUSec")["CPUQuotaPerSecUSec"] == "250ms"
            # Still above `high` for three more intervals: the quota stays at min_cpu.
            deadline = time.monotonic() + 3.2
            while time.monotonic() < deadline:
                assert sample() == "25000 100000"
                time.sleep(0.2)
            avg10_hog = cpu_avg10()
            assert avg10_hog > HIGH
        finally:
            stall = hog.stop()
        log(f"hog stopped at avg10 {avg10_hog}, {stall / 1e6:.1f} s of cpu stall")
        wait_for(lambda: sample() == "100000 100000", timeout=90, what="cpu.max back at max_cpu")
        assert show(SCOPE, "CPUQuotaPerSecUSec")["CPUQuotaPerSecUSec"] == "1s"
        quotas = [int(v.split()[0]) for v in seen]
        log(f"cpu.max quotas seen: {quotas}")
        assert quotas == [100000, 50000, 25000, 50000, 75000, 100000]  # halved, then +0.25/step
        sets = d.actions("neighbour-guard", "set_limits")
        assert [e["values"]["cpu"] for e in sets] == ["100%", "50%", "25%", "50%", "75%", "100%"]
        assert all(e["result"] == "done" for e in sets)
        for e in sets[1:3]:  # the cuts saw the hog's pressure, the raises saw it gone
            assert float(e["reason"].split()[-1].rstrip("%")) > HIGH, e
        for e in sets[3:]:
            assert float(e["reason"].split()[-1].rstrip("%")) < LOW, e
        assert d.worker("tiny-0")["cgroup"]["cpu.max"] == "100000 100000"
    finally:
        d.policy("neighbour-guard", interval_s=3600.0)  # inert from here on


# -- memory-tuner ------------------------------------------------------------------------

MIN_BYTES = 16 * MIB
TARGET_US = 2000


def test_memory_tuner_probes_memory_high_down_and_backs_off_under_stall(daemon):
    d = daemon
    mem = SCOPE_DIR
    current0 = int((mem / "memory.current").read_text())
    stat0 = keyed(mem / "memory.stat")
    log(f"worker memory.current {current0 / MIB:.1f} MiB, anon {stat0['anon'] / MIB:.1f}, "
        f"file {stat0['file'] / MIB:.1f}; memory.high {memory_high()}")
    assert memory_high() is None  # no limit yet: the tuner starts from memory.current
    stall0 = psi(mem / "memory.pressure")["total"]
    high_events0 = keyed(mem / "memory.events")["high"]
    gen = Generator(d.socket, max_tokens=48)  # the worker touches its memory all along
    d.policy("memory-tuner", target_us=TARGET_US, probe=0.2, backoff=0.5, min_bytes=MIN_BYTES,
             max_bytes=1 << 30, interval_s=1.0)
    highs: list[int] = []

    def sample() -> list[int]:
        value = memory_high()
        if value is not None and (not highs or value != highs[-1]):
            highs.append(value)
            log(f"memory.high {value / MIB:.1f} MiB, current "
                f"{int((mem / 'memory.current').read_text()) / MIB:.1f} MiB, stall "
                f"{psi(mem / 'memory.pressure')['total']:.0f} us, high events "
                f"{keyed(mem / 'memory.events')['high']}")
        return highs

    def rose_after_falling() -> bool:
        h = sample()
        falls = [i for i in range(1, len(h)) if h[i] < h[i - 1]]
        return len(falls) >= 2 and any(h[j] > h[j - 1] for j in range(falls[1] + 1, len(h)))

    try:
        wait_for(rose_after_falling, timeout=90, what="memory.high probed down, then raised")
        stall = psi(mem / "memory.pressure")["total"] - stall0
        high_events = keyed(mem / "memory.events")["high"] - high_events0
        sets = d.actions("memory-tuner", "set_limits")
    finally:
        d.policy("memory-tuner", interval_s=3600.0)  # inert from here on
        results = gen.stop()
        d.client.call("limits", model="tiny", memory_high="max")
    log(f"memory.high seen (MiB): {[round(h / MIB, 1) for h in highs]}; stall {stall:.0f} us, "
        f"high events {high_events}, requests {len(results)}")
    assert min(highs) >= MIN_BYTES
    assert highs[0] < current0 * 1.2  # the first probe starts from memory.current
    assert stall > TARGET_US and high_events > 0  # the kernel saw the squeeze
    values = [int(e["values"]["memory_high"]) for e in sets]
    assert values[0] == highs[0] and min(values) >= MIN_BYTES
    assert all(e["result"] == "done" for e in sets)
    ups = [i for i in range(1, len(values)) if values[i] > values[i - 1]]
    downs = [i for i in range(1, len(values)) if values[i] < values[i - 1]]
    assert ups and downs, values
    for i in ups:  # each raise answered measured stall above the target, each cut its absence
        assert int(sets[i]["reason"].split(": ")[1].split()[0]) > TARGET_US, sets[i]
    for i in downs:
        assert int(sets[i]["reason"].split(": ")[1].split()[0]) <= TARGET_US, sets[i]
    assert show(SCOPE, "MemoryHigh")["MemoryHigh"] == "infinity"  # restored
    assert all(r["event"] == "done" for r in results), results
