"""threads: each worker runs as many threads as there are CPUs nobody else wants (on by default).

llama.cpp's threads meet at a barrier after every step of a decode and spin there until
the last one arrives. When another process holds a core one of them needs, the others
spin for as long as the scheduler lets it run. Measured here (2 cores, SmolLM2): beside
one busy process a 2-thread worker decoded 36-44 tok/s and a 1-thread one 86, and the
busy process did 35-46 % more work beside the 1-thread one; with no neighbour, 2 threads
gave 143 tok/s and 1 gave 88. So the count follows the CPU that is really free, not only
the quota.

For each worker that is not pinned (`threads = N` in its model's config):

- **cap**: its CPU affinity, cut to the whole CPUs of its cgroup quota (cgroup v2
  `cpu.max` or v1 `cpu.cfs_quota_us`, as the kernel has it); at least 1. Over the cap,
  the count drops at once (reason `affinity` or `quota`).
- **others**: tasks that want a CPU and are not workers: `procs_running` of /proc/stat
  less the workers' own runnable threads and the daemon's reader, averaged over the last
  three readings. The daemon reads every 0.2 s (jittered); where the kernel takes PSI
  triggers, it reads right after one (on /proc/pressure/cpu, or on a worker scope's
  cpu.pressure) and between them every second, and a triggered reading's instant stands
  alone (daemon/control/cpumonitor.py).
- **target**: the workers' CPUs less `others` (and less the threads of busy pinned
  workers), shared by the workers that are generating (an idle one counts itself in),
  plus `margin`, rounded down; between 1 and the cap. So a worker gives up a CPU once
  others want more than `margin` of it.
- **fewer threads** (reason `contention`): at once, if the worker is idle, or if its own
  threads waited for a CPU (schedstat run delay of at least `wait_min` threads over the
  last readings, or a trigger on its own scope: the kernel saw them wait): runnable
  tasks on CPUs the worker does not use cost it nothing.
- **more threads**: onto CPUs that were idle (`idle_min` of each, from /proc/stat), once
  that has lasted `raise_after_s`. Idle time, not `procs_running`, decides here: it
  counts a neighbour that runs part of the time, which instants can miss.
- At most one change per worker per `interval_s`. The worker takes a change at the start
  of a llama_decode call (a token, or a chunk of the prompt): a call in progress is
  stopped, its partial work dropped, and made again with the new count, so a slow token
  computed with too many threads does not hold the change back (daemon/worker/decodestop.py).

The thresholds come from bench/threads_signals.py (docs/benchmarks.md, "Which signal
shows a neighbour"). With 2 threads, `others` read 0.01 with no neighbour, 0.39 beside a
process busy a quarter of the time, 0.57 beside one busy half the time and 1.0 beside a
busy one; the worker's wait read 0.01 with no neighbour and 0.22 or more beside any of
them. Beside the half-busy one, 2 threads decoded 18 % faster but the neighbour lost
47 % of its work, so `margin` 0.5 yields there; beside the quarter-busy one the worker
keeps both (31 % faster, the neighbour loses 20 %): lower `margin` to protect such
neighbours more. With 1 thread, the idle CPU read 0.98 with no neighbour and 0.74 and
0.49 beside the quarter- and half-busy ones, so `idle_min` 0.8 takes a thread back only
when it is free. System CPU PSI tracks the worker's own wait (0.50 vs 0.70 beside a busy
process) but also counts every other stalled task, so it wakes the daemon (the trigger)
and the worker's own wait confirms.

Every change is recorded with its reason (`llmctl events`); `llmctl status` shows each
worker's threads and why. Turn it off with `enabled = false` in its table, or
`llmctl policy disable threads`: each worker then keeps the count it has (at start:
its affinity and quota).

    [[policies]]
    name = "threads"
    raise_after_s = 3.0
"""

from __future__ import annotations

import math

from ..placement.cpus import cap
from .base import Action, Event, Param, Policy, PolicyError, SetThreads, Snapshot, WorkerView

LIVE = ("idle", "busy")


def cap_of(w: WorkerView) -> tuple[int, str]:
    """The most threads the worker's affinity and quota allow, and which of them binds."""
    return cap(w.allowed_cpus or w.threads, w.quota)


class Threads(Policy):
    name = "threads"
    on_by_default = True
    events = frozenset({"cpu", "tick", "started", "finished", "limits"})
    params = {
        "margin": Param(float, 0.5, "part of a CPU others may want before a worker gives "
                        "it up", 0.0, 0.95),
        "wait_min": Param(float, 0.1, "a generating worker gives up threads only if its "
                          "threads waited for a CPU this much (threads, on average)",
                          0.0, 64.0),
        "idle_min": Param(float, 0.8, "idle share of each CPU it takes back", 0.05, 1.0),
        "interval_s": Param(float, 0.5, "least time between two changes of a worker's "
                            "count", 0.2, 60.0),
        "raise_after_s": Param(float, 3.0, "how long CPUs must stay free before a worker "
                               "takes them back", 0.5, 600.0),
    }

    def __init__(self, **settings: object) -> None:
        super().__init__(**settings)
        self.changed_at: dict[str, float] = {}  # worker -> when its count last changed
        self.higher_since: dict[str, float] = {}  # worker -> since when the target is higher

    def check_together(self, settings: dict[str, object]) -> None:
        if settings["raise_after_s"] < settings["interval_s"]:  # type: ignore[operator]
            raise PolicyError(f"raise_after_s = {settings['raise_after_s']} is below "
                              f"interval_s = {settings['interval_s']}: a count could be "
                              "taken back before the last change settled")

    def on_event(self, event: Event, snap: Snapshot) -> list[Action]:
        live = [w for w in snap.workers if w.state in LIVE]
        flexible = [w for w in live if not w.threads_pinned]
        for gone in set(self.changed_at) - {w.name for w in flexible}:
            self.changed_at.pop(gone, None)  # stopped, restarted or pinned
            self.higher_since.pop(gone, None)
        busy = [w for w in live if w.state == "busy"]
        view = snap.cpu
        cpus = view.cpus if view else max((w.allowed_cpus for w in live), default=1)
        others = view.others_running if view else 0.0
        free = cpus - others - sum(w.threads for w in busy if w.threads_pinned)
        generating = sum(1 for w in busy if not w.threads_pinned)
        actions = []
        for w in flexible:
            sharers = generating if w.state == "busy" else generating + 1
            action = self._decide(w, snap, free / max(1, sharers), sharers, others, cpus)
            if action is not None:
                self.changed_at[w.name] = snap.now
                self.higher_since.pop(w.name, None)
                actions.append(action)
        return actions

    def _decide(self, w: WorkerView, snap: Snapshot, share: float, sharers: int,
                others: float, cpus: int) -> SetThreads | None:
        s, now = self.settings, snap.now
        cap, cap_why = cap_of(w)
        current = w.threads_asked or w.threads
        target = max(1, min(cap, math.floor(share + s["margin"])))
        if current > cap:  # a quota or affinity change: no waiting
            return SetThreads(w.name, target,
                              reason=cap_why if target == cap else self._why(others, cpus, sharers))
        settled = now - self.changed_at.get(w.name, -math.inf) >= s["interval_s"]
        if target < current:
            self.higher_since.pop(w.name, None)
            load = snap.cpu.workers.get(w.name) if snap.cpu else None
            # a trigger on its own scope is the kernel's word that its threads waited
            waited = (w.state != "busy" or (load is not None and load.wait >= s["wait_min"])
                      or (snap.cpu is not None and snap.cpu.waited_on_own_scope(w.name)))
            if settled and waited:
                why = self._why(others, cpus, sharers)
                if load is not None and w.state == "busy":
                    why += f"; its threads waited {load.wait:.2f}"
                return SetThreads(w.name, target, reason=why)
            return None
        # More threads only onto CPUs that were idle: a neighbour that wants a part of a
        # CPU shows as less idle time, whatever the instants of procs_running caught.
        idle = snap.cpu.idle if snap.cpu else 0.0
        want = min(target, current + math.floor(idle / s["idle_min"] + 1e-9))
        if want <= current:
            self.higher_since.pop(w.name, None)
            return None
        since = self.higher_since.setdefault(w.name, now)
        if now - since < s["raise_after_s"] or not settled:
            return None
        why = cap_why if want == cap else self._why(others, cpus, sharers)
        return SetThreads(w.name, want,
                          reason=f"{why}; {idle:.2f} CPUs idle for {now - since:.1f} s")

    @staticmethod
    def _why(others: float, cpus: int, sharers: int) -> str:
        shared = f", shared by {sharers} generating workers" if sharers > 1 else ""
        return f"contention: {others:.2f} other runnable tasks on {cpus} CPUs{shared}"
