"""kv-trim: give memory back when a worker's scope is short of it, by cutting its KV cache.

When a memory pressure trigger fires on a worker's scope, or on a tick its memory `some
avg10` is at or above `some_above` percent, the policy asks that worker, at most once per
`cooldown_s`, to reduce its KV cache:

- mode `trim`: of the sequences running on that worker, take the one that holds the most
  KV cells (the worker reports them each second) and drop the middle of it, keeping its
  first `keep` tokens (the instructions) and its last `tail` (the recent text), if at
  least `min_prune` can go. The rest is shifted down, as llama.cpp's context shift does,
  and generation goes on; the other sequences are not touched. It bounds how much more
  cache the longest sequence touches.
- mode `shrink`: reopen the worker's context at `factor` of its size per sequence, not
  below `min_ctx`, for all its sequences at once. Their states are saved, the llama
  context freed and made again smaller, and the states restored, so the continuations
  are unchanged; the freed cache goes back to the kernel. A sequence too long for the
  smaller context is trimmed first.

While the worker's prompt cache holds memory, the policy waits: the daemon gives the
cache back first (each memory trigger halves it), and cuts the running sequences' KV only
once it is empty.

After `restore_after_s` with the pressure below `some_above`, an idle worker's context
grows back to its configured size; so does a shrunk one that a new request needs room in
(prompt plus max_tokens), before it starts (recorded as `grow_kv`). Either way the
request goes on: no OOM kill.

Research: kv-psi (shared/research/004) trims a llama.cpp KV cache when memory PSI rises
(keep 64, tail 256, min-prune 64). Measured here: closing a context took a worker's RSS
from 937 to 112 MB; restoring the sequence took 2.5 ms and continued identically.

    [[policies]]
    name = "kv-trim"
    mode = "shrink"
    min_ctx = 512
"""

from __future__ import annotations

from .base import (
    Action,
    Event,
    Param,
    Policy,
    PolicyError,
    PsiTrigger,
    RequestView,
    ShrinkKv,
    Snapshot,
    Tick,
    TrimKv,
    WorkerView,
)


class KvTrim(Policy):
    name = "kv-trim"
    events = frozenset({"pressure", "tick"})
    params = {
        "mode": Param(str, "trim", "trim (drop the middle of the sequence) or shrink (a "
                      "smaller context)"),
        "some_above": Param(float, 10.0, "memory some avg10 (%) of the scope that counts as "
                            "pressure on a tick", 0.0, 100.0),
        "keep": Param(int, 64, "tokens kept at the start of the sequence", 0, 1 << 20),
        "tail": Param(int, 256, "tokens kept at the end of the sequence", 0, 1 << 20),
        "min_prune": Param(int, 64, "trim only if at least this many tokens can go", 1, 1 << 20),
        "factor": Param(float, 0.5, "shrink: new context size as a fraction of the current",
                        0.05, 0.95),
        "min_ctx": Param(int, 256, "shrink: smallest context", 16, 1 << 20),
        "cooldown_s": Param(float, 5.0, "seconds between two cuts of one worker", 0.0, 3600.0),
        "restore_after_s": Param(float, 60.0, "calm seconds before an idle worker gets its "
                                 "configured context back", 1.0, 86400.0),
    }

    def __init__(self, **settings: object) -> None:
        super().__init__(**settings)
        self.last_cut: dict[str, float] = {}
        self.calm_since: dict[str, float] = {}

    def configure(self, **settings: object) -> None:
        if settings.get("mode", "trim") not in ("trim", "shrink"):
            raise PolicyError(f"mode must be trim or shrink, not {settings['mode']!r}")
        super().configure(**settings)

    def on_event(self, event: Event, snap: Snapshot) -> list[Action]:
        actions = []
        for w in snap.workers:
            mem = w.pressure.get("memory")
            pressed = mem is not None and mem.some_avg10 >= self.settings["some_above"]
            if isinstance(event, PsiTrigger):
                pressed = event.key == f"{w.name}/memory"
            elif not pressed:
                self.calm_since.setdefault(w.name, snap.now)
            if pressed:
                self.calm_since.pop(w.name, None)
                action = self._cut(w, snap.now, snap.running)
            else:
                action = self._restore(w, snap.now) if isinstance(event, Tick) else None
            if action is not None:
                actions.append(action)
        return actions

    def _cut(self, w: WorkerView, now: float,
             running: tuple[RequestView, ...]) -> TrimKv | ShrinkKv | None:
        s = self.settings
        if now - self.last_cut.get(w.name, -1e18) < s["cooldown_s"] or w.prompt_cache_bytes:
            return None  # the daemon empties the prompt cache first, a trigger at a time
        why = f"memory pressure in {w.name}'s scope"
        if s["mode"] == "trim":
            mine = [r for r in running if r.worker == w.name]
            if not mine:
                return None
            longest = max(mine, key=lambda r: (r.kv_cells, r.tokens))
            self.last_cut[w.name] = now
            return TrimKv(w.name, keep=s["keep"], tail=s["tail"], min_prune=s["min_prune"],
                          req=longest.id,
                          reason=f"{why}; {longest.id} holds {longest.kv_cells} KV cells")
        n_ctx = max(s["min_ctx"], int(w.n_ctx * s["factor"]))
        if not w.n_ctx or n_ctx >= w.n_ctx:
            return None
        self.last_cut[w.name] = now
        return ShrinkKv(w.name, n_ctx, keep=s["keep"], tail=s["tail"], reason=why)

    def _restore(self, w: WorkerView, now: float) -> ShrinkKv | None:
        calm = now - self.calm_since.get(w.name, now)
        if w.state != "idle" or not w.n_ctx or w.n_ctx >= w.n_ctx_max \
                or calm < self.settings["restore_after_s"]:
            return None
        self.calm_since.pop(w.name)
        return ShrinkKv(w.name, w.n_ctx_max, reason=f"calm for {calm:.0f} s: configured "
                        "context back")
