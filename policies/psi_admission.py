"""psi-admission: hold new requests back while the rest of the machine is under CPU pressure.

When a CPU pressure trigger fires and the CPU `some avg10` outside the workers' cgroups
is at or above `defer_above` percent, the policy defers new requests: they stay queued,
in order, and are never dropped. While it defers, up to `keep_running` requests of each
model still run (queued ones are admitted in order to fill that), so the model keeps
working instead of idling; 0 holds every new request back. It re-admits all of them once
that pressure has stayed at or below `admit_below` for `calm_s` seconds (checked on each
tick). A request deferred longer than `max_defer_s` is admitted anyway, so nothing
starves.

Which pressure: "outside" is the highest CPU some avg10 among the top-level cgroups
(system.slice, user.slice, ...) that hold no worker, i.e. the programs the LLM shares
the machine with. The system-wide `/proc/pressure/cpu` is not used when that is known:
it also counts the workers' stalls on their own cpu.max (a worker throttled at 50 %
shows about 50 % system pressure with nothing else running), so the policy deferred
with no neighbour at all. `scope_pressure` adds the workers' scopes' CPU pressure.

With batching, `keep_running` counts sequences: the requests running in the model's
slots, summed over its workers (a worker with `parallel = 4` and four requests counts
four). Admission is this policy's lever on the batch: a deferred request stays queued and
takes no slot, so while the pressure lasts the batch grows by at most what
`keep_running` leaves room for, and the sequences already running finish (none is
stopped). It does not also narrow the batch with `set_batch`: a request admitted after
`max_defer_s` must get a slot at once, which a batch limit would refuse, and a limit left
behind would outlive the pressure that set it.

Why `keep_running`: holding everything back while a co-located program keeps the CPU
busy leaves the model idle, and the pressure (the other program's own) never falls, so
every request waited `max_defer_s` and then all started at once. Both measured in the
systemd guest, docs/benchmarks.md.

Research: a static 50 % quota made p95 latency 20–40× worse; gating admission on PSI
gave 6.8× better p95 at concurrency 8 (shared/research/000). That work polled a 10 s
average; here a trigger starts the deferral the moment the kernel reports the stall.

    [[policies]]
    name = "psi-admission"
    defer_above = 40.0
    admit_below = 20.0
    keep_running = 1
"""

from __future__ import annotations

from .base import Action, Admit, Defer, Event, Param, Policy, PsiTrigger, RequestView, Snapshot, Tick


class PsiAdmission(Policy):
    name = "psi-admission"
    events = frozenset({"pressure", "tick", "queued", "started", "finished", "preempted"})
    params = {
        "defer_above": Param(float, 40.0, "outside CPU some avg10 (%) at which to start "
                             "deferring", 0.0, 100.0),
        "admit_below": Param(float, 20.0, "outside CPU some avg10 (%) below which to admit "
                             "again", 0.0, 100.0),
        "calm_s": Param(float, 2.0, "seconds pressure must stay low before admitting", 0.0, 600.0),
        "max_defer_s": Param(float, 30.0, "longest a request is held back", 0.1, 86400.0),
        "keep_running": Param(int, 1, "requests (sequences, over all the model's slots) that "
                              "may still run while deferring (0: hold every new one)", 0, 1024),
        "scope_pressure": Param(bool, False, "count the workers' own scopes' CPU pressure too "
                                "(under a cpu.max quota that includes their throttling)"),
    }

    def __init__(self, **settings: object) -> None:
        super().__init__(**settings)
        self.deferring = False
        self.calm_since: float | None = None

    def _cpu(self, snap: Snapshot) -> float:
        """CPU some avg10 outside the workers, or the worst of it and their scopes'."""
        values = [snap.neighbour_pressure("cpu")]
        if self.settings["scope_pressure"]:
            values += [w.pressure["cpu"].some_avg10 for w in snap.workers if "cpu" in w.pressure]
        return max(values, default=0.0)

    def _heeds(self, key: str) -> bool:
        """A CPU trigger that counts: the system's, or with scope_pressure a scope's too."""
        return key == "system/cpu" or (self.settings["scope_pressure"] and key.endswith("/cpu"))

    def on_event(self, event: Event, snap: Snapshot) -> list[Action]:
        cpu = self._cpu(snap)
        if isinstance(event, PsiTrigger) and self._heeds(event.key):
            if cpu >= self.settings["defer_above"]:
                self.deferring, self.calm_since = True, None
        elif isinstance(event, Tick) and self.deferring:
            if cpu <= self.settings["admit_below"]:
                self.calm_since = self.calm_since if self.calm_since is not None else snap.now
                if snap.now - self.calm_since >= self.settings["calm_s"]:
                    self.deferring, self.calm_since = False, None
            else:
                self.calm_since = None
        running: dict[str, int] = {}
        for r in snap.running:
            running[r.model] = running.get(r.model, 0) + 1
        return [self._decide(r, cpu, running) for r in snap.queued]

    def _decide(self, req: RequestView, cpu: float, running: dict[str, int]) -> Admit | Defer:
        if not self.deferring:
            return Admit(req.id)
        if running.get(req.model, 0) < self.settings["keep_running"]:
            running[req.model] = running.get(req.model, 0) + 1  # counts as running from now on
            return Admit(req.id, reason=f"outside cpu some avg10 {cpu:.1f}%: within "
                         f"keep_running {self.settings['keep_running']}")
        if req.waited_s >= self.settings["max_defer_s"]:
            return Admit(req.id, reason=f"deferred {req.waited_s:.1f} s: admitted anyway")
        return Defer(req.id, reason=f"outside cpu some avg10 {cpu:.1f}%")
