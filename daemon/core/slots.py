"""Slots: each worker runs up to `slots` requests (sequences) in one batch. This module
hands queued requests to free slots, keeps the batch limits the policies set
(`set_batch`), and finds the worker running a request (for preempt, cancel, KV ops).

Narrow on purpose: it sees workers through `free_slots`, `running` and `run`, queues
through `pop`, and the policies through two callables; service.py wires it up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog

from ..policies.base import BATCH_UNLIMITED

if TYPE_CHECKING:
    from .models import Models
    from .requests import ModelQueue, Request
    from .workers import Worker

log = structlog.get_logger()


class HandOver(NamedTuple):
    """A request that could not be handed to a worker, and why."""

    req: Request
    worker: str
    error: Exception


class Slots:
    """Dispatch into free slots, within the batch limits of set_batch."""

    def __init__(self, models: Models) -> None:
        self.models = models
        # set_batch limits of single workers; a model's is Model.batch_limit. A worker's
        # limit is the least of its own and its model's.
        self.by_worker: dict[str, int] = {}

    def limit(self, worker: Worker) -> int:
        """The most slots dispatch fills on worker: its slots, or fewer under set_batch."""
        model = self.models.get(worker.model.name)
        return min(worker.slots, self.by_worker.get(worker.name, BATCH_UNLIMITED),
                   model.batch_limit if model is not None else BATCH_UNLIMITED)

    def free(self, worker: Worker) -> int:
        return min(worker.free_slots, max(0, self.limit(worker) - len(worker.running)))

    def fill(self, queue: ModelQueue, workers: list[Worker], held: Callable[[str], bool],
             rank: Callable[[str], float]) -> tuple[list[Request], list[HandOver]]:
        """Start queued requests in the free slots of workers, the emptiest worker first
        (so that requests spread over the model's processes); returns those started, and
        those whose hand-over failed (their slot stays free: the caller fails them)."""
        started: list[Request] = []
        failed: list[HandOver] = []
        while queue:
            worker = max(workers, key=lambda w: (self.free(w), -w.index), default=None)
            if worker is None or self.free(worker) <= 0:
                break
            req = queue.pop(held=held, rank=rank)
            if req is None:
                break
            log.debug("request_dispatched", request=req.id, worker=worker.name,
                      slots_busy=len(worker.running) + 1, slots=worker.slots)
            try:
                worker.run(req)
            except Exception as exc:  # whatever it was, req must end
                failed.append(HandOver(req, worker.name, exc))
            else:
                started.append(req)
        return started, failed

    def set_batch(self, target: str, sequences: int) -> str:
        """Limit the slots dispatch fills on a worker, or on each worker of a model (a
        running sequence above the limit finishes; none is stopped). Returns the result
        the policy engine records: done, unchanged, or no such worker or model."""
        value = min(sequences, BATCH_UNLIMITED)
        if self.models.worker(target) is not None:
            was = self.by_worker.get(target, BATCH_UNLIMITED)
            if value == BATCH_UNLIMITED:
                self.by_worker.pop(target, None)
            else:
                self.by_worker[target] = value
        elif (model := self.models.get(target)) is not None and model.workers:
            was, model.batch_limit = model.batch_limit, value
        else:
            return "no such worker or model"
        return "unchanged" if was == value else "done"

    def running(self, request_id: str) -> Worker | None:
        """The worker running request_id, if one does."""
        return next((w for w in self.models.workers() if request_id in w.running), None)

    def preempt(self, request_id: str, state_min_tokens: int) -> str:
        """Ask the worker running request_id to give up its slot; returns what happened."""
        worker = self.running(request_id)
        if worker is None:
            return "not running"
        worker.preempt(worker.running[request_id], state_min_tokens)
        return "asked"

    def kv_op(self, worker_name: str, op: str, values: dict[str, Any]) -> str:
        """trim_kv (of the sequence `req` names, else the longest) or shrink_kv (n_ctx per
        sequence) on a worker; returns asked, or why not."""
        worker = self.models.worker(worker_name)
        if worker is None or worker.pid is None:
            return "no such worker"
        if op == "shrink_kv" and values["n_ctx"] > worker.model.n_ctx:
            return f"refused: n_ctx above the configured {worker.model.n_ctx}"
        if op == "trim_kv" and values.get("req") not in (None, *worker.running):
            return f"refused: {values['req']} is not running on {worker_name}"
        worker.kv_op(op, values)
        return "asked"
