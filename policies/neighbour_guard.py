"""neighbour-guard: keep co-located programs alive by lowering the LLM's CPU quota (AIMD).

Every `interval_s`, it looks at the CPU `some avg10` outside the workers: the highest
among the top-level cgroups (system.slice, user.slice, ...) that hold no worker; the
system-wide value where cgroup2 is not available. Above `high` percent it
cuts each model's worker quota multiplicatively (times `decrease`), never below
`min_cpu`. Below `low` it gives back `step` CPUs, never above `max_cpu`. Between the two
it holds. Each step starts from the quota the daemon reports for the model (no quota
counts as `max_cpu`), so a change that failed to apply is tried again. This is
additive-increase / multiplicative-decrease, the rule TCP uses to share a link. The
system-wide pressure is not used: it also counts the workers' own stalls on the quota
the guard set (a lone worker throttled at 50 % showed 49.7 % system CPU some in the
systemd guest, docs/benchmarks.md).

Research: LLM-OS caps LLM throughput to protect the host's other programs
(shared/research/002); PSI gives the signal that the others are stalling.

    [[policies]]
    name = "neighbour-guard"
    high = 30.0
    min_cpu = 0.25
"""

from __future__ import annotations

from .base import Action, Event, Param, Policy, Snapshot


class NeighbourGuard(Policy):
    name = "neighbour-guard"
    events = frozenset({"tick"})
    params = {
        "high": Param(float, 30.0, "outside CPU some avg10 (%) above which to cut", 0.0, 100.0),
        "low": Param(float, 10.0, "outside CPU some avg10 (%) below which to give back",
                     0.0, 100.0),
        "decrease": Param(float, 0.5, "factor applied to the quota on a cut", 0.05, 0.95),
        "step": Param(float, 0.25, "CPUs given back per interval", 0.01, 64.0),
        "min_cpu": Param(float, 0.25, "lowest quota in CPUs", 0.01, 1024.0),
        "max_cpu": Param(float, 2.0, "highest quota in CPUs", 0.01, 1024.0),
        "interval_s": Param(float, 2.0, "seconds between decisions", 0.5, 3600.0),
    }

    def on_event(self, event: Event, snap: Snapshot) -> list[Action]:
        if not self.due(event, snap.now, self.settings["interval_s"]):
            return []
        s = self.settings
        cpu = snap.neighbour_pressure("cpu")
        actions = []
        for model, now in sorted({w.model: w.cpu for w in snap.workers}.items()):
            old = min(s["max_cpu"], now) if now is not None else s["max_cpu"]
            if cpu > s["high"]:
                new = max(s["min_cpu"], old * s["decrease"])
            elif cpu < s["low"]:
                new = min(s["max_cpu"], old + s["step"])
            else:
                new = old
            if now is None or abs(new - now) > 1e-9:
                actions.append(Action("set_limits", model, {"cpu": f"{new * 100:g}%"},
                                      reason=f"outside cpu some avg10 {cpu:.1f}%"))
        return actions
