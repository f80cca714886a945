"""The core: accept requests, queue them per model, dispatch to free slots, finish each once."""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from pathlib import Path
from typing import Any

import structlog

from .. import logs
from ..control import cpumonitor, psi
from ..control.metrics import ModelMetrics
from ..control.observer import Observer
from ..control.policyengine import PolicyEngine
from ..paths import default_state_dir
from ..placement.limits import LimitError, Limits, check_order
from ..placement.placer import Placement
from ..placement.scopes import Backend
from ..policies import (
    CpuRead,
    Event,
    Finished,
    LimitsSet,
    Preempted,
    PsiTrigger,
    Queued,
    Snapshot,
    Started,
    Tick,
)
from ..wire import messages
from ..wire.protocol import ProtocolError, check_model
from . import modelsource, supervision
from .actuator import Actuator
from .config import Config, ModelConfig, limits_of, trigger_of
from .lifecycle import Lifecycle
from .requests import ModelQueue, Request, Sink
from .slots import Slots
from .workers import Worker

log = structlog.get_logger()
PRESSURE_EVENTS_KEPT = 200
TICK_S = 1.0


class Service:
    def __init__(self, config: Config, socket_path: Path) -> None:
        self.config = config
        self.socket_path = socket_path
        self.state_dir = Path(config.daemon.state_dir or default_state_dir())
        self.started_at = time.monotonic()
        self.stopping = False
        self.reloader: Any = None  # reload.Reloader: the last reload; models add/remove use it
        self.queues: dict[str, ModelQueue] = {}
        self.metrics: dict[str, ModelMetrics] = {}
        self.workers: dict[str, list[Worker]] = {}
        self.limits: dict[str, Limits] = {}
        self.paths: dict[str, Path] = {}
        self._path_locks: dict[str, asyncio.Lock] = {}
        self.lifecycle = Lifecycle(self)  # which models are loaded: load, keep-alive, evict
        for model in config.models.values():
            self.add_model(model)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count(1)
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task] = []
        self._supervisors: dict[Worker, asyncio.Task] = {}
        self.placement = Placement()  # scopes: the backend's calls, limits, OOM kills
        self.slots = Slots(self.all_workers)  # dispatch, batch limits, per-request commands
        self.psi: psi.PsiWatcher | None = None
        self.pressure_events: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=PRESSURE_EVENTS_KEPT)
        self.engine = PolicyEngine(list(config.policies))
        self.observer = Observer(lambda: {w.name: w.scope.cgroup if w.scope else None
                                          for w in self.all_workers()})
        self.actuator = Actuator(self)
        self.engine.bind(self.actuator)
        self._system_trigger = trigger_of(config.daemon.psi_system_trigger)
        self._scope_trigger = trigger_of(config.daemon.psi_scope_trigger)
        self.cpu = cpumonitor.CpuMonitor(
            lambda: {w.name: w.pid for w in self.all_workers() if w.pid is not None},
            lambda: {w.name for w in self.all_workers() if not w.model.threads},
            self.observer.outside_cgroups, lambda: self.notify(CpuRead()),
            config.daemon.cpu_poll_interval,
            trigger_of(config.daemon.psi_cpu_trigger))

    async def start(self) -> None:
        """Choose the backend, clear stale scopes, arm PSI triggers, start the workers."""
        loop = asyncio.get_running_loop()
        daemon = self.config.daemon
        await self.placement.start(daemon.backend, daemon.slice, daemon.worker_user)
        self.psi = psi.PsiWatcher(loop, self._on_pressure)
        self.psi.start()
        for resource in psi.RESOURCES if self._system_trigger else ():
            self._watch(f"system/{resource}", psi.SYSTEM / resource, self._system_trigger)
        self.cpu.start(self.psi)
        for name in self.config.models:
            self.lifecycle.begin(name)
        self._tasks.append(loop.create_task(self._tick(), name="policy-tick"))

    async def _tick(self) -> None:
        """A tick for the policies every second; then run whatever they admitted."""
        while True:
            await asyncio.sleep(TICK_S)
            self.notify(Tick())

    def notify(self, event: Event) -> None:
        self.engine.notify(event)
        self.lifecycle.check()
        for model in self.queues:
            self.dispatch(model)

    def _watch(self, key: str, path: Path, trigger: psi.Trigger) -> None:
        assert self.psi is not None
        try:
            self.psi.add(key, path, trigger)
        except psi.PsiUnavailable as exc:
            log.warning("psi_trigger_unavailable", key=key, error=str(exc))

    def _on_pressure(self, event: psi.PressureEvent) -> None:
        if self.cpu.is_trigger(event.key):
            self.cpu.triggered(event.key)  # it reads the CPUs and tells the policies
            return
        entry = {"key": event.key, "path": event.path, "at": event.at,
                 "trigger": event.trigger.line().decode()}
        self.pressure_events.append(entry)
        log.info("pressure_event", **entry)
        self.lifecycle.pressure(event.key)
        self.notify(PsiTrigger(event.key))

    # -- scopes ------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        return self.placement.backend

    async def place(self, worker: Worker) -> None:
        """Put a new worker process into its scope, and watch the scope's pressure."""
        self.engine.kv_asked.pop(worker.name, None)  # a new process answers nothing old
        cgroup = await self.placement.place(worker, self.limits[worker.model.name])
        if cgroup is None:
            return
        if self._system_trigger and self.psi is not None and "slice/memory" not in self.psi.counts:
            # The slice's own memory pressure (the lifecycle unloads idle models on it); it
            # exists once a scope does.
            self._watch("slice/memory", cgroup.parent / "memory.pressure", self._system_trigger)
        trigger = self._scope_trigger
        for resource in psi.RESOURCES if trigger else ():
            self._watch(f"{worker.name}/{resource}", cgroup / f"{resource}.pressure", trigger)
        self.cpu.watch_scope(worker.name, cgroup)

    def oom_killed(self, worker: Worker) -> bool:
        return self.placement.oom_killed(worker)

    async def release(self, worker: Worker) -> None:
        if self.psi is not None:
            for resource in psi.RESOURCES:
                self.psi.remove(f"{worker.name}/{resource}")
        self.cpu.unwatch_scope(worker.name)
        await self.placement.release(worker)

    async def set_limits(self, model: str, **changes: Any) -> dict[str, Any]:
        """Change a model's worker limits live; the policies hear of it (threads follow
        the new CPU quota)."""
        if model not in self.limits:
            raise ProtocolError("no_such_model", f"no model {model!r}")
        new = self.limits[model].merged(**changes)
        try:
            check_order(new)
        except LimitError as exc:
            raise ProtocolError("bad_request", str(exc)) from None
        await self.placement.apply(self.workers[model], self.limits[model], new)
        self.limits[model] = new
        log.info("limits_changed", model=model, **new.describe())
        self.cpu.refresh_caps()
        self.notify(LimitsSet(model))
        return new.describe()

    def all_workers(self) -> list[Worker]:
        return [w for ws in self.workers.values() for w in ws]

    # -- models come and go (reload.py) ---------------------------------------------

    def add_model(self, model: ModelConfig) -> None:
        """A model's queue, metrics and limits; its workers start when the lifecycle loads
        it (lifecycle.begin, or its first request)."""
        name = model.name
        self.queues[name] = ModelQueue(name, model.max_queue, model.max_queue_per_uid)
        self.metrics[name] = ModelMetrics()
        self.limits[name] = limits_of(model)
        self._path_locks[name] = asyncio.Lock()
        self.workers[name] = []
        self.lifecycle.add(name)

    def new_worker(self, model: ModelConfig, index: int) -> Worker:
        daemon = self.config.daemon
        return Worker(model, index, self, daemon.restart_backoff_max, daemon.worker_user)

    def start_workers(self, workers: list[Worker]) -> None:
        loop = asyncio.get_running_loop()
        for worker in workers:
            self._supervisors[worker] = loop.create_task(worker.supervise(), name=worker.name)

    async def retire_workers(self, workers: list[Worker], grace: float,
                             finish_requests: bool = True) -> None:
        """Stop workers (each once its running requests are done, taking no new one, unless
        finish_requests is False), end their supervisors and release their scopes."""
        await asyncio.gather(*(w.retire(grace) if finish_requests else w.stop(grace)
                               for w in workers))
        tasks = [self._supervisors.pop(w) for w in workers if w in self._supervisors]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in workers:
            if worker.scope is not None:
                await self.release(worker)
                worker.scope = None

    def drop_model(self, name: str) -> None:
        """Forget a removed model whose requests are done and whose workers are retired."""
        for table in (self.queues, self.metrics, self.workers, self.limits, self.paths,
                      self._path_locks, self.slots.by_model):
            table.pop(name, None)
        self.lifecycle.forget(name)

    # -- model files -------------------------------------------------------------

    async def model_path(self, model: str) -> Path:
        # A model a reload removed still drains with its workers' config.
        cfg = self.config.models.get(model) or self.workers[model][0].model
        async with self._path_locks[model]:
            path = self.paths.get(model)
            if path is None or not path.exists():
                path = await asyncio.to_thread(modelsource.resolve, cfg, self.state_dir)
                self.paths[model] = path
            return path

    def model_state(self, model: str) -> str:
        loaded = self.lifecycle.state(model)  # its workers say more once they exist
        workers = self.workers[model]
        return supervision.model_state(workers) if workers and loaded != "unloading" else loaded

    def unavailable_reason(self, model: str) -> str:
        return supervision.load_trouble(model, self.workers[model])

    # -- requests ----------------------------------------------------------------

    def submit(self, model: str, prompt: str, params: dict[str, Any], priority: int,
               timeout: float | None, uid: int, sink: Sink,
               keep_alive: str | None = None) -> tuple[Request, int]:
        """Accept a request into its model's queue; returns it and its queue position."""
        if self.stopping:
            raise ProtocolError("shutting_down", "the daemon is stopping")
        check_model(model, self.config.models)  # a removed model drains, but takes no more
        if self.model_state(model) == "unavailable":
            raise ProtocolError("model_unavailable", self.unavailable_reason(model))
        req = Request(id=f"r{next(self._ids)}", model=model, prompt=prompt, params=params,
                      priority=priority, uid=uid, sink=sink)
        position = self.queues[model].push(req)
        self.requests[req.id] = req
        self.lifecycle.accepted(req, keep_alive)
        if timeout is not None:
            req.deadline = req.accepted_at + timeout
            loop = asyncio.get_running_loop()
            self._timers[req.id] = loop.call_later(timeout, self._expire, req.id)
        log.info("request_accepted", request=req.id, model=model, priority=priority,
                 position=position, uid=uid, prompt_chars=req.prompt_chars)
        asyncio.get_running_loop().call_soon(
            self.notify, Queued(req.id, model))
        return req, position

    def dispatch(self, model: str) -> None:
        for req in self.slots.fill(self.queues[model], self.workers[model],
                                   self.engine.is_deferred, self.engine.rank):
            self.engine.notify(Started(req.id, model))

    def _live(self, request_id: str) -> Request:
        req = self.requests.get(request_id)
        if req is None:
            raise ProtocolError("no_such_request", f"no queued or running request {request_id}")
        return req

    def stop_request(self, request_id: str, code: str, message: str) -> Request:
        """Fail a queued or running request now; a running one is told to stop."""
        req = self._live(request_id)
        if self.queues[req.model].remove(request_id) is None and (
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
                stats: dict[str, Any] | None = None) -> None:
        if self.requests.pop(req.id, None) is None:
            return
        timer = self._timers.pop(req.id, None)
        if timer is not None:
            timer.cancel()
        if stats is not None:
            req.done(stats)
            self.metrics[req.model].record_done(stats)
        else:
            req.fail(outcome, message)
            self.metrics[req.model].record_outcome(outcome)
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
        now, w = time.monotonic(), msg.stats
        stats = {
            "model": req.model, "worker": worker.name,
            "prompt_tokens": w.prompt_tokens, "completion_tokens": w.completion_tokens,
            "finish_reason": w.finish_reason,
            "queue_s": (req.started_at or now) - req.accepted_at,
            "ttft_s": req.first_token_at - req.accepted_at if req.first_token_at else None,
            "total_s": now - req.accepted_at,
            "prefill_s": w.prefill_s, "tokens_per_s": w.tokens_per_s,
            "preemptions": req.preemptions, "cold": req.cold, "load_s": req.load_s,
        }
        self._finish(req, "completed", stats=stats)

    def worker_error(self, worker: Worker, req: Request, code: str, message: str) -> None:
        self._finish(req, code, message)

    def worker_lost(self, worker: Worker, req: Request, code: str, message: str) -> None:
        """req's worker died or hung: without a token yet, req waits for the next worker."""
        if req.id in self.requests and (failure := supervision.after_loss(req, code, message)):
            self._finish(req, *failure)
        elif req.id in self.requests:
            self.queues[req.model].push(req, requeue=True)
            log.info("request_requeued", request=req.id, worker=worker.name, why=code)
            self.notify(Queued(req.id, req.model))  # and dispatch

    def worker_preempted(self, worker: Worker, req: Request, resume: messages.Resume) -> None:
        """Queue a preempted request again in its old place; it resumes where it stopped."""
        if req.id not in self.requests:
            return  # cancelled or expired while it was being preempted
        req.preemptions += 1
        req.resume = resume
        self.queues[req.model].push(req, requeue=True)
        how = "recompute" if resume.state is None else "restore"
        log.info("request_preempted", request=req.id, worker=worker.name,
                 generated=resume.generated, context=len(resume.context), resume=how,
                 state_bytes=len(resume.state or b""))
        req.emit({"event": "preempted", "tokens": resume.generated, "resume": how})
        self.engine.notify(Preempted(req.id, req.model))

    def worker_kv(self, worker: Worker, report: messages.Kv) -> None:
        log.info("kv_changed", worker=worker.name,
                 **{k: v for k, v in messages.as_dict(report).items() if k != "type"})
        self.engine.kv_reported(worker.name, report)

    def worker_load_failed(self, worker: Worker) -> None:
        model = worker.model.name
        if self.model_state(model) == "unavailable":
            while (req := self.queues[model].pop()) is not None:
                self._finish(req, "model_unavailable", self.unavailable_reason(model))

    # -- views (the status and models ops: views.py) ----------------------------------

    def snapshot(self) -> Snapshot:
        """What the policies see: PSI, workers with their scope stats, waiting requests."""
        return self.actuator.snapshot()

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
        await self.retire_workers(self.all_workers(), self.config.daemon.shutdown_grace,
                                  finish_requests=False)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.cpu.stop()
        if self.psi is not None:
            self.psi.stop()
        self.placement.close()

