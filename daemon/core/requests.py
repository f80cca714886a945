"""Requests and the bounded per-model priority queue (higher priority first, FIFO within)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..wire import events
from ..wire.protocol import ProtocolError

if TYPE_CHECKING:
    from ..catalog.config import ModelConfig
    from ..wire.messages import RequestParams, Resume, Stats

Sink = Callable[[events.Event], None]


@dataclass(eq=False)
class Request:
    """One accepted submit: queued, then running on a worker, then finished once."""

    id: str
    model: str
    params: RequestParams
    priority: int = 0
    uid: int = -1
    deadline: float | None = None  # time.monotonic()
    timer: asyncio.TimerHandle | None = None  # fails it at the deadline
    sink: Sink | None = None
    accepted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    finished: bool = False
    tokens_sent: int = 0
    preemptions: int = 0
    lost_workers: int = 0  # workers that died or hung under it before its first token
    resume: Resume | None = None  # from the worker that was preempted
    seq: int | None = None  # FIFO order in its queue, kept when it is queued again
    cold: bool = False  # its model was not loaded when it came
    load_s: float | None = None  # how long it waited for its model to load

    @property
    def prompt_chars(self) -> int:
        """The prompt's length, or its messages' (for the log and shortest-job-first)."""
        return len(self.params.prompt) + sum(len(m["content"])
                                             for m in self.params.messages or ())

    def stats(self, worker: str, w: Stats) -> dict[str, Any]:
        """What its done event and the log say of a completed request: the worker's
        counts and speeds, and the times this side saw (queued, first token, total)."""
        now = time.monotonic()
        return {
            "model": self.model, "worker": worker,
            "prompt_tokens": w.prompt_tokens, "completion_tokens": w.completion_tokens,
            "cached_tokens": w.cached_tokens,
            "finish_reason": w.finish_reason,
            "queue_s": (self.started_at or now) - self.accepted_at,
            "ttft_s": self.first_token_at - self.accepted_at if self.first_token_at else None,
            "total_s": now - self.accepted_at,
            "prefill_s": w.prefill_s, "tokens_per_s": w.tokens_per_s,
            "preemptions": self.preemptions, "cold": self.cold, "load_s": self.load_s,
        }

    # -- the events streamed to the client: built here, and only here -----------------

    def _emit(self, event: events.Event) -> None:
        if self.sink is not None:
            self.sink(event)

    def loading(self) -> None:
        """It waits for its model to load."""
        self._emit(events.Loading(model=self.model))

    def token(self, text: str, tokens: int = 1) -> None:
        """Text of one or more tokens, streamed to the client."""
        if self.finished:
            return
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.tokens_sent += tokens
        self._emit(events.Token(text=text, tokens=tokens))

    def preempted(self, tokens: int, resume: str) -> None:
        """A policy took its slot after `tokens` tokens; it resumes by restore or recompute."""
        self._emit(events.Preempted(tokens=tokens, resume=resume))

    def done(self, stats: dict[str, Any]) -> None:
        if not self.finished:
            self.finished = True
            self._emit(events.Done(stats=stats))

    def fail(self, code: str, message: str, param: str | None = None) -> None:
        if not self.finished:
            self.finished = True
            self._emit(events.Error(error=events.Failure(code, message, param)))


class ModelQueue:
    """Bounded priority queue of one model's waiting requests."""

    def __init__(self, name: str, limit: int, per_uid: int | None = None) -> None:
        self.name = name
        self.limit = limit
        self.per_uid = per_uid or limit  # max_queue_per_uid: one uid cannot fill the queue
        self._heap: list[tuple[int, int, Request]] = []
        self._live: dict[str, Request] = {}
        self._seq = itertools.count()

    def bound(self, model: ModelConfig) -> None:
        """Take a reloaded model config's max_queue and max_queue_per_uid."""
        self.limit, self.per_uid = model.max_queue, model.max_queue_per_uid

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Request]:
        """Waiting requests, highest priority first, FIFO within a priority."""
        return self.ordered()

    def ordered(self, rank: Callable[[str], float] = lambda _id: 0.0) -> Iterator[Request]:
        """Waiting requests in the order pop() would hand them out."""
        entries = sorted(self._heap, key=lambda e: (e[0], rank(e[2].id), e[1]))
        return (r for _, _, r in entries if r.id in self._live)

    def push(self, req: Request, requeue: bool = False) -> int:
        """Queue req and return how many requests run before it; queue_full if at the limit.
        A preempted request (requeue) goes back in its old place, even over the limits."""
        if len(self._live) >= self.limit and not requeue:
            raise ProtocolError(
                "queue_full", f"model {self.name!r} has {len(self._live)} requests queued "
                f"(max_queue {self.limit})")
        mine = 0 if requeue else sum(1 for r in self._live.values() if r.uid == req.uid)
        if mine >= self.per_uid:
            raise ProtocolError(
                "too_many_requests", f"uid {req.uid} has {mine} requests waiting for model "
                f"{self.name!r} (max_queue_per_uid {self.per_uid}); wait until one starts")
        if req.seq is None:
            req.seq = next(self._seq)
        heapq.heappush(self._heap, (-req.priority, req.seq, req))
        self._live[req.id] = req
        return sum(1 for r in self._live.values() if r.priority >= req.priority) - 1

    def pop(self, held: Callable[[str], bool] = lambda _id: False,
            rank: Callable[[str], float] = lambda _id: 0.0) -> Request | None:
        """The next request to run: highest priority, then lowest rank(id), then FIFO;
        passing over those that held(id) says to keep back."""
        self._heap = [e for e in self._heap if e[2].id in self._live]  # drop removed ones
        for entry in sorted(self._heap, key=lambda e: (e[0], rank(e[2].id), e[1])):
            if not held(entry[2].id):
                self._heap.remove(entry)
                heapq.heapify(self._heap)
                return self._live.pop(entry[2].id)
        return None

    def remove(self, request_id: str) -> Request | None:
        """Take a waiting request out (its heap entry is dropped lazily)."""
        return self._live.pop(request_id, None)
