"""priority: a waiting higher-priority request preempts a running lower-priority one.

When a request waits and no worker of its model has a free slot (every slot within the
batch limit runs a sequence), the policy looks at the requests running there. If one has
a priority at least `min_gap` below the waiting request's, it is preempted (the lowest
priority first, then the one with the least output): its worker takes that one sequence
out of the batch at the next step, or during its prompt evaluation, while the others go
on; the daemon queues it again in its old place, and the waiting request takes the slot.
The preempted request later resumes where it stopped, and its client sees one stream of
tokens with a `preempted` event in it. A context of at least `state_min_tokens` tokens is saved and restored
(llama_state_seq_get_data: the sequence's KV cache alone, not the logits); a shorter one
is recomputed, which costs less than copying its state. A request is preempted at most
`max_preemptions` times, so low priorities still finish. Requests that another policy
holds back do not preempt.

Research: LLM-OS (shared/research/002) schedules by priority with interrupts, and its
context manager chooses between recomputing a KV cache and saving/loading it.

    [[policies]]
    name = "priority"
    state_min_tokens = 256
"""

from __future__ import annotations

from .base import Action, Event, Param, Policy, Preempt, RequestView, Snapshot


class Priority(Policy):
    name = "priority"
    params = {
        "min_gap": Param(int, 1, "priority difference needed to preempt", 1, 1000),
        "state_min_tokens": Param(int, 256, "contexts this long or longer are saved and "
                                  "restored; shorter ones are recomputed", 0, 1 << 24),
        "max_preemptions": Param(int, 3, "times one request may be preempted", 0, 1000),
    }

    def __init__(self, **settings: object) -> None:
        super().__init__(**settings)
        self.asked: set[str] = set()  # preempted, not yet back in the queue

    def on_event(self, event: Event, snap: Snapshot) -> list[Action]:
        self.asked &= {r.id for r in snap.running}
        actions = []
        for model in sorted({r.model for r in snap.queued}):
            waiting = sorted((r for r in snap.queued if r.model == model and not r.deferred),
                             key=lambda r: -r.priority)
            running = [r for r in snap.running if r.model == model]
            # The first in line take the free slots, and those being given up, from nobody.
            free = sum(w.free_slots for w in snap.workers if w.model == model)
            pending = sum(1 for r in running if r.id in self.asked)
            for req in waiting[free + pending:]:
                victim = self._victim(req, running)
                if victim is None:
                    break
                self.asked.add(victim.id)
                actions.append(Preempt(
                    victim.id, self.settings["state_min_tokens"],
                    reason=f"{req.id} (priority {req.priority}) waits; {victim.id} has "
                    f"priority {victim.priority}"))
        return actions

    def _victim(self, req: RequestView, running: list[RequestView]) -> RequestView | None:
        s = self.settings
        candidates = [r for r in running if r.id not in self.asked
                      and r.priority <= req.priority - s["min_gap"]
                      and r.preemptions < s["max_preemptions"]]
        return min(candidates, key=lambda r: (r.priority, r.tokens), default=None)
