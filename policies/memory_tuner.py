"""memory-tuner: find the memory.high each model's workers really need, senpai-style.

Every `interval_s`, for each worker it takes the growth of its scope's memory stall time
(memory.pressure `some` total). Below `target_us` the worker is not short of memory, so
memory.high is probed down by `probe` (a fraction, at most 1 % by default), starting from
memory.current. Above the target it backs off fast: up by `backoff` of the limit. The
limit stays between `min_bytes` and `max_bytes`. A model with several workers follows its
neediest one; a worker still loading its model is left alone. Reclaim that memory.high
drives is gentle (no OOM kill); the kernel's own pressure tells how far is too far.

Research: Meta's senpai (10 ms of stall per 6 s interval as the default target).

    [[policies]]
    name = "memory-tuner"
    target_us = 10000
    min_bytes = 134217728
"""

from __future__ import annotations

from .base import Action, Event, Param, Policy, SetLimits, Snapshot

PAGE = 4096


class MemoryTuner(Policy):
    name = "memory-tuner"
    events = frozenset({"tick"})
    params = {
        "target_us": Param(int, 10_000, "memory stall per interval that is acceptable (us)",
                           0, 10_000_000),
        "probe": Param(float, 0.01, "fraction to lower memory.high by when calm", 0.0, 0.2),
        "backoff": Param(float, 0.2, "fraction to raise memory.high by under pressure",
                         0.01, 4.0),
        "min_bytes": Param(int, 128 << 20, "lowest memory.high", 16 << 20, 1 << 50),
        "max_bytes": Param(int, 64 << 30, "highest memory.high", 16 << 20, 1 << 50),
        "interval_s": Param(float, 6.0, "seconds between decisions", 0.5, 3600.0),
    }

    def __init__(self, **settings: object) -> None:
        super().__init__(**settings)
        self.totals: dict[str, int] = {}

    def on_event(self, event: Event, snap: Snapshot) -> list[Action]:
        if not self.due(event, snap.now, self.settings["interval_s"]):
            return []
        wanted: dict[str, tuple[int, str]] = {}
        for w in snap.workers:
            mem = w.pressure.get("memory")
            if mem is None or w.memory_current is None or w.state not in ("idle", "busy"):
                continue  # no scope, or a model still loading
            previous = self.totals.get(w.name)
            self.totals[w.name] = mem.some_total
            if previous is None:
                continue  # the first look only sets the baseline
            delta = mem.some_total - previous
            limit = self._next(w.memory_high or w.memory_current, delta)
            if w.model not in wanted or limit > wanted[w.model][0]:
                wanted[w.model] = (limit, f"{w.name}: {delta} us of memory stall")
        return [SetLimits(model, memory_high=str(limit), reason=why)
                for model, (limit, why) in sorted(wanted.items())]

    def _next(self, current: int, stall_us: int) -> int:
        s = self.settings
        factor = 1 - s["probe"] if stall_us <= s["target_us"] else 1 + s["backoff"]
        limit = min(s["max_bytes"], max(s["min_bytes"], int(current * factor)))
        return limit // PAGE * PAGE
