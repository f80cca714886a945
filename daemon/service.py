"""The core: accept requests, queue them per model, dispatch to idle workers, finish each once."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path
from typing import Any

import structlog

from . import __version__, modelsource
from .config import Config
from .metrics import ModelMetrics
from .paths import default_state_dir
from .protocol import PROTOCOL_VERSION, ProtocolError
from .scheduler import ModelQueue, Request, Sink
from .workers import Worker

log = structlog.get_logger()


class Service:
    def __init__(self, config: Config, socket_path: Path) -> None:
        self.config = config
        self.socket_path = socket_path
        self.state_dir = Path(config.daemon.state_dir or default_state_dir())
        self.started_at = time.monotonic()
        self.stopping = False
        self.queues = {n: ModelQueue(n, m.max_queue) for n, m in config.models.items()}
        self.metrics = {n: ModelMetrics() for n in config.models}
        self.workers = {
            n: [Worker(m, i, self, config.daemon.restart_backoff_max) for i in range(m.workers)]
            for n, m in config.models.items()
        }
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count(1)
        self._paths: dict[str, Path] = {}
        self._path_locks = {n: asyncio.Lock() for n in config.models}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for worker in self.all_workers():
            self._tasks.append(loop.create_task(worker.supervise(), name=worker.name))

    def all_workers(self) -> list[Worker]:
        return [w for ws in self.workers.values() for w in ws]

    # -- model files -------------------------------------------------------------

    async def model_path(self, model: str) -> Path:
        async with self._path_locks[model]:
            path = self._paths.get(model)
            if path is None or not path.exists():
                cfg = self.config.models[model]
                path = await asyncio.to_thread(modelsource.resolve, cfg, self.state_dir)
                self._paths[model] = path
            return path

    def model_state(self, model: str) -> str:
        """ready (a worker is up), unavailable (every worker failed to load) or loading."""
        workers = self.workers[model]
        if any(w.state in ("idle", "busy") for w in workers):
            return "ready"
        if all(w.load_error for w in workers):
            return "unavailable"
        return "loading"

    def _unavailable_reason(self, model: str) -> str:
        reasons = sorted({w.load_error for w in self.workers[model] if w.load_error})
        return f"model {model!r} cannot be loaded: {'; '.join(reasons)}"

    # -- requests ----------------------------------------------------------------

    def submit(self, model: str, prompt: str, params: dict[str, Any], priority: int,
               timeout: float | None, uid: int, sink: Sink) -> tuple[Request, int]:
        """Accept a request into its model's queue; returns it and its queue position."""
        if self.stopping:
            raise ProtocolError("shutting_down", "the daemon is stopping")
        if model not in self.queues:
            known = ", ".join(sorted(self.queues))
            raise ProtocolError("no_such_model", f"no model {model!r} (configured: {known})")
        if self.model_state(model) == "unavailable":
            raise ProtocolError("model_unavailable", self._unavailable_reason(model))
        req = Request(id=f"r{next(self._ids)}", model=model, prompt=prompt, params=params,
                      priority=priority, uid=uid, sink=sink)
        position = self.queues[model].push(req)
        self.requests[req.id] = req
        if timeout is not None:
            req.deadline = req.accepted_at + timeout
            loop = asyncio.get_running_loop()
            self._timers[req.id] = loop.call_later(timeout, self._expire, req.id)
        log.info("request_accepted", request=req.id, model=model, priority=priority,
                 position=position, uid=uid, prompt_chars=len(prompt))
        asyncio.get_running_loop().call_soon(self.dispatch, model)
        return req, position

    def dispatch(self, model: str) -> None:
        queue = self.queues[model]
        for worker in self.workers[model]:
            if not queue:
                return
            if worker.idle:
                req = queue.pop()
                if req is not None:
                    log.debug("request_dispatched", request=req.id, worker=worker.name)
                    worker.run(req)

    def _live(self, request_id: str) -> Request:
        req = self.requests.get(request_id)
        if req is None:
            raise ProtocolError("no_such_request", f"no queued or running request {request_id}")
        return req

    def stop_request(self, request_id: str, code: str, message: str) -> Request:
        """Fail a queued or running request now; a running one is told to stop."""
        req = self._live(request_id)
        if self.queues[req.model].remove(request_id) is None:
            for worker in self.workers[req.model]:
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
        if req is not None:
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
        details = stats or {"model": req.model, "error": message}
        log.info("request_finished", request=req.id, outcome=outcome, **details)

    # -- worker callbacks ------------------------------------------------------------

    def worker_idle(self, worker: Worker) -> None:
        self.dispatch(worker.model.name)

    def worker_done(self, worker: Worker, req: Request, msg: dict[str, Any]) -> None:
        if msg.get("cancelled"):
            log.info("worker_stopped_request", request=req.id, worker=worker.name,
                     stage=msg["stage"], completion_tokens=msg["completion_tokens"])
            self._finish(req, "cancelled", "the worker stopped the request")
            return
        now = time.monotonic()
        w = msg["stats"]
        stats = {
            "model": req.model, "worker": worker.name,
            "prompt_tokens": w["prompt_tokens"], "completion_tokens": w["completion_tokens"],
            "finish_reason": w["finish_reason"],
            "queue_s": (req.started_at or now) - req.accepted_at,
            "ttft_s": req.first_token_at - req.accepted_at if req.first_token_at else None,
            "total_s": now - req.accepted_at,
            "prefill_s": w["prefill_s"], "tokens_per_s": w["tokens_per_s"],
        }
        self._finish(req, "completed", stats=stats)

    def worker_error(self, worker: Worker, req: Request, code: str, message: str) -> None:
        self._finish(req, code, message)

    def worker_load_failed(self, worker: Worker) -> None:
        model = worker.model.name
        if self.model_state(model) == "unavailable":
            while (req := self.queues[model].pop()) is not None:
                self._finish(req, "model_unavailable", self._unavailable_reason(model))

    # -- views --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "daemon": {
                "version": __version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started_at, 3),
                "socket": str(self.socket_path), "config": self.config.source,
                "backend": "none", "stopping": self.stopping,
            },
            "workers": [w.describe() for w in self.all_workers()],
            "models": {
                name: {
                    "state": self.model_state(name),
                    "queue_depth": len(queue), "max_queue": queue.limit,
                    "running": sum(1 for w in self.workers[name] if w.current is not None),
                    "queued": [r.id for r in queue],
                    **self.metrics[name].snapshot(),
                }
                for name, queue in self.queues.items()
            },
        }

    def models(self) -> list[dict[str, Any]]:
        out = []
        for name, cfg in self.config.models.items():
            workers = self.workers[name]
            out.append({
                "name": name, "state": self.model_state(name),
                "source": cfg.package or cfg.path,
                "path": str(self._paths[name]) if name in self._paths else None,
                "workers": len(workers), "n_ctx": cfg.n_ctx, "max_tokens": cfg.max_tokens,
                "error": self._unavailable_reason(name) if any(w.load_error for w in workers)
                else None,
            })
        return out

    # -- shutdown -------------------------------------------------------------------

    def fail_all(self) -> None:
        """Refuse new work and fail every live request with shutting_down."""
        self.stopping = True
        for request_id in list(self.requests):
            self.stop_request(request_id, "shutting_down", "the daemon is stopping")

    async def stop(self) -> None:
        """Stop the workers (after fail_all)."""
        self.fail_all()
        workers = self.all_workers()
        await asyncio.gather(*(w.stop(self.config.daemon.shutdown_grace) for w in workers))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
