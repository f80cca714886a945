"""The request path: accept requests, queue them per model, dispatch to free slots, finish each
once. Its parts are given to it (core/wiring.py builds them), so a test can drive it with fakes."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import structlog

from .. import logs
from ..catalog.config import Config, cache_bytes
from ..control.observer import Observer
from ..control.policyengine import PolicyEngine
from ..control.watches import Watches
from ..placement.scopes import Backend
from ..placement.users import worker_dir
from ..policies import Event, Finished, Preempted, PsiTrigger, Queued, Started, Tick
from ..wire import messages
from ..wire.protocol import ProtocolError, check_model
from . import supervision
from .fleet import Fleet
from .lifecycle import Lifecycle
from .models import Models
from .requests import Request, Sink
from .slots import Slots
from .workers import Worker

log = structlog.get_logger()
TICK_S = 1.0


class Service:
    def __init__(self, config: Config, socket_path: Path, state_dir: Path, *, models: Models,
                 slots: Slots, engine: PolicyEngine, fleet: Fleet, watches: Watches,
                 observer: Observer, lifecycle: Lifecycle | None = None) -> None:
        self.config = config
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.models = models
        self.slots = slots
        self.engine = engine
        self.fleet = fleet
        self.watches = watches
        self.observer = observer
        self.lifecycle = lifecycle or Lifecycle(self, models)  # load, keep-alive, evict
        self.started_at = time.monotonic()
        self.stopping = False
        self.reloader: Any = None  # reload.Reloader: the last reload; models add/remove use it
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Choose the backend, clear stale scopes, arm PSI triggers, start the workers."""
        daemon = self.config.daemon
        await self.fleet.placement.start(daemon.backend, daemon.slice, daemon.worker_user)
        self.watches.start()
        for name in self.config.models:
            self.lifecycle.begin(name)
        self._tasks.append(asyncio.get_running_loop().create_task(self._tick(), name="policy-tick"))

    async def _tick(self) -> None:
        """A tick for the policies every second; then run whatever they admitted."""
        while True:
            await asyncio.sleep(TICK_S)
            self.notify(Tick())

    def notify(self, event: Event) -> None:
        self.engine.notify(event)
        self.lifecycle.check()
        for model in self.models:
            self.dispatch(model.name)

    def pressure(self, key: str) -> None:
        """A PSI trigger fired (watches.py): the lifecycle and the policies hear of it."""
        self.lifecycle.pressure(key)
        self.notify(PsiTrigger(key))

    @property
    def backend(self) -> Backend:
        return self.fleet.placement.backend

    # -- what a worker asks of the daemon (workers.Listener) -------------------------

    async def model_path(self, model: str) -> Path:
        return await self.models[model].resolve_path(self.state_dir)

    async def place(self, worker: Worker) -> None:
        self.engine.kv_asked.pop(worker.name, None)  # a new process answers nothing old
        await self.fleet.place(worker)

    async def release(self, worker: Worker) -> None:
        await self.fleet.release(worker)

    def oom_killed(self, worker: Worker) -> bool:
        return self.fleet.placement.oom_killed(worker)

    def prompt_cache(self, worker: Worker) -> tuple[int, int, str]:
        """The worker's prompt cache: bytes in memory (sized at load, lower while memory
        pressure keeps it shrunk), bytes on disk, and its model's directory of files."""
        model = self.models[worker.model.name]
        size = cache_bytes(worker.model.prompt_cache, "prompt_cache")  # a reload may change it
        memory = model.life.cache_limit if size is None else size
        if model.life.cache_shrunk_at is not None:
            memory = 0
        disk = cache_bytes(worker.model.prompt_cache_disk, "prompt_cache_disk") or 0
        if not disk:
            return memory, 0, ""
        folder = self.state_dir / "prompt-cache" / worker.model.name / f"worker-{worker.index}"
        try:
            worker_dir(folder, self.config.daemon.worker_user)
        except OSError as exc:  # the worker tries too, and reports why in its status
            log.error("prompt_cache_dir_failed", model=model.name, path=str(folder),
                      error=str(exc))
        return memory, disk, str(folder)

    # -- requests ----------------------------------------------------------------

    def submit(self, model: str, params: messages.RequestParams, priority: int,
               timeout: float | None, uid: int, sink: Sink,
               keep_alive: str | None = None) -> tuple[Request, int]:
        """Accept a request into its model's queue; returns it and its queue position."""
        if self.stopping:
            raise ProtocolError("shutting_down", "the daemon is stopping")
        check_model(model, self.config.models)  # a removed model drains, but takes no more
        target = self.models[model]
        if target.state() == "unavailable":
            raise ProtocolError("model_unavailable", target.unavailable_reason())
        req = Request(id=f"r{next(self._ids)}", model=model, params=params,
                      priority=priority, uid=uid, sink=sink)
        position = target.queue.push(req)
        self.requests[req.id] = req
        self.lifecycle.accepted(req, keep_alive)
        if timeout is not None:
            req.deadline = req.accepted_at + timeout
            req.timer = asyncio.get_running_loop().call_later(timeout, self._expire, req.id)
        log.info("request_accepted", request=req.id, model=model, priority=priority,
                 position=position, uid=uid, prompt_chars=req.prompt_chars)
        asyncio.get_running_loop().call_soon(
            self.notify, Queued(req.id, model))
        return req, position

    def dispatch(self, name: str) -> None:
        model = self.models[name]
        started, failed = self.slots.fill(model.queue, model.workers, self.engine.is_deferred,
                                          self.engine.rank)
        for req in started:
            self.engine.notify(Started(req.id, name))
        for req, worker, exc in failed:
            log.error("handover_failed", request=req.id, worker=worker, exc_info=exc)
            self._finish(req, "handover_failed", f"the request could not be handed to "
                         f"worker {worker}: {type(exc).__name__}: {exc}")

    def _live(self, request_id: str) -> Request:
        req = self.requests.get(request_id)
        if req is None:
            raise ProtocolError("no_such_request", f"no queued or running request {request_id}")
        return req

    def stop_request(self, request_id: str, code: str, message: str) -> Request:
        """Fail a queued or running request now; a running one is told to stop."""
        req = self._live(request_id)
        if self.models[req.model].queue.remove(request_id) is None and (
                worker := self.slots.running(request_id)) is not None:
            worker.cancel(req)
        self._finish(req, code, message)
        return req

    def cancel(self, request_id: str, uid: int) -> Request:
        req = self._live(request_id)
        if uid not in (0, req.uid):
            raise ProtocolError("forbidden", f"request {request_id} belongs to uid {req.uid}")
        return self.stop_request(request_id, "cancelled", f"request {request_id} was cancelled")

    def _expire(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is not None and self.engine.is_deferred(request_id):
            self.stop_request(request_id, "deferred_timeout", "the request's timeout passed "
                              "while a policy held it back (CPU or memory pressure)")
        elif req is not None:
            self.stop_request(request_id, "timeout", "the request's timeout passed "
                              f"after {time.monotonic() - req.accepted_at:.1f} s")

    def _finish(self, req: Request, outcome: str, message: str = "",
                stats: dict[str, Any] | None = None, param: str | None = None) -> None:
        if self.requests.pop(req.id, None) is None:
            return
        if req.timer is not None:
            req.timer.cancel()
        metrics = self.models[req.model].metrics
        if stats is not None:
            req.done(stats)
            metrics.record_done(stats)
        else:
            req.fail(outcome, message, param)
            metrics.record_outcome(outcome)
        logs.request_finished(req.id, outcome, stats or {"model": req.model, "error": message})
        self.engine.forget(req.id)
        self.engine.notify(Finished(req.id, req.model))

    # -- worker callbacks ------------------------------------------------------------

    def worker_idle(self, worker: Worker) -> None:
        self.lifecycle.check()  # a model that came up: its waiting requests were cold
        self.dispatch(worker.model.name)

    def worker_done(self, worker: Worker, req: Request, msg: messages.Done) -> None:
        if msg.cancelled or msg.stats is None:
            log.info("worker_stopped_request", request=req.id, worker=worker.name,
                     stage=msg.stage, completion_tokens=msg.completion_tokens)
            self._finish(req, "cancelled", "the worker stopped the request")
            return
        self._finish(req, "completed", stats=req.stats(worker.name, msg.stats))

    def worker_error(self, worker: Worker, req: Request, code: str, message: str,
                     param: str | None = None) -> None:  # a refusal names its field
        self._finish(req, code, message, param=param)

    def worker_lost(self, worker: Worker, req: Request, code: str, message: str) -> None:
        """req's worker died or hung: without a token yet, req waits for the next worker."""
        if req.id in self.requests and (failure := supervision.after_loss(req, code, message)):
            self._finish(req, *failure)
        elif req.id in self.requests:
            self.models[req.model].queue.push(req, requeue=True)
            log.info("request_requeued", request=req.id, worker=worker.name, why=code)
            self.notify(Queued(req.id, req.model))  # and dispatch

    def worker_preempted(self, worker: Worker, req: Request, resume: messages.Resume) -> None:
        """Queue a preempted request again in its old place; it resumes where it stopped."""
        if req.id not in self.requests:
            return  # cancelled or expired while it was being preempted
        req.preemptions += 1
        req.resume = resume
        self.models[req.model].queue.push(req, requeue=True)
        how = "recompute" if resume.state is None else "restore"
        log.info("request_preempted", request=req.id, worker=worker.name,
                 generated=resume.generated, context=len(resume.context), resume=how,
                 state_bytes=len(resume.state or b""))
        req.preempted(resume.generated, how)
        self.engine.notify(Preempted(req.id, req.model))

    def worker_kv(self, worker: Worker, report: messages.Kv) -> None:
        log.info("kv_changed", worker=worker.name,
                 **{k: v for k, v in messages.as_dict(report).items() if k != "type"})
        self.engine.kv_reported(worker.name, report)

    def worker_load_failed(self, worker: Worker) -> None:
        model = self.models[worker.model.name]
        if model.state() == "unavailable":
            while (req := model.queue.pop()) is not None:
                self._finish(req, "model_unavailable", model.unavailable_reason())

    # -- shutdown -------------------------------------------------------------------

    def fail_all(self) -> None:
        """Refuse new work and fail every live request with shutting_down."""
        self.stopping = True
        for request_id in list(self.requests):
            self.stop_request(request_id, "shutting_down", "the daemon is stopping")

    async def stop(self) -> None:
        """Stop the workers (after fail_all)."""
        self.fail_all()
        self.lifecycle.close()
        await self.fleet.retire(self.models.workers(), self.config.daemon.shutdown_grace,
                                finish_requests=False)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.watches.stop()
        self.fleet.placement.close()
