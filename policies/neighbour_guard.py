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

With `scale_batch` (on by default), the batch follows the quota: each worker of the model
fills at most `ceil(parallel × quota / max_cpu)` of its slots (at least one), and all of
them once the quota is back at `max_cpu` (a `set_batch` action on the model). Why: the
quota bounds the CPU the workers take whatever the batch, so the neighbours are protected
by the cut alone; what the batch width decides is how the smaller CPU is shared. A step
costs more CPU the more sequences it holds, so with every slot kept full a cut to half
slows each running request's stream to about half its speed and its clients all wait
longer together. Narrowed with the quota, the requests that run keep most of their token
rate, and the others wait in the queue, where `priority` and `sjf` choose which run
next. The cost is throughput under a cut (a batch shares the weight reads, so one wide
step costs less than several narrow ones); `scale_batch = false` keeps every slot filled.

Research: LLM-OS caps LLM throughput to protect the host's other programs
(shared/research/002); PSI gives the signal that the others are stalling.

    [[policies]]
    name = "neighbour-guard"
    high = 30.0
    min_cpu = 0.25
"""

from __future__ import annotations

import math

from .base import BATCH_UNLIMITED, Action, Event, Param, Policy, SetBatch, SetLimits, Snapshot


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
        "scale_batch": Param(bool, True, "fill each worker's slots in proportion to the "
                             "quota (ceil(parallel x quota / max_cpu)); all of them at max_cpu"),
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
                actions.append(SetLimits(model, cpu=f"{new * 100:g}%",
                                         reason=f"outside cpu some avg10 {cpu:.1f}%"))
            batch = self._batch(model, new, snap) if s["scale_batch"] else None
            if batch is not None:
                actions.append(batch)
        return actions

    def _batch(self, model: str, quota: float, snap: Snapshot) -> SetBatch | None:
        """set_batch for the model's workers when the width for `quota` is not theirs."""
        workers = [w for w in snap.workers if w.model == model and w.slots]
        if not workers:
            return None  # not loaded yet: the slot count is unknown
        slots = max(w.slots for w in workers)
        share = quota / self.settings["max_cpu"]
        width = slots if share >= 1 else max(1, math.ceil(slots * share - 1e-9))
        if all(w.batch_limit == min(width, w.slots) for w in workers):
            return None
        return SetBatch(model, width if width < slots else BATCH_UNLIMITED,
                        reason=f"quota {quota:g} of max_cpu {self.settings['max_cpu']:g} CPUs: "
                        f"{width} of {slots} slots")
