"""The models' worker processes: started with their supervisors, placed in their scopes
(watched for pressure and CPU), given new limits live, retired and released."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from ..catalog.config import Config, ModelConfig
from ..control.watches import Watches
from ..placement.limits import LimitError, check_order
from ..placement.placer import Placement
from ..wire.protocol import ProtocolError
from .models import Models
from .workers import Listener, Worker

log = structlog.get_logger()


class Fleet:
    def __init__(self, config: Callable[[], Config], models: Models, placement: Placement,
                 watches: Watches, limits_changed: Callable[[str], None]) -> None:
        self.config = config  # the running config (a reload replaces it)
        self.models = models
        self.placement = placement
        self.watches = watches
        self.limits_changed = limits_changed  # the policies hear of it
        self._supervisors: dict[Worker, asyncio.Task] = {}

    def new_worker(self, model: ModelConfig, index: int, listener: Listener) -> Worker:
        daemon = self.config().daemon
        return Worker(model, index, listener, daemon.restart_backoff_max, daemon.worker_user)

    def start(self, workers: list[Worker]) -> None:
        loop = asyncio.get_running_loop()
        for worker in workers:
            self._supervisors[worker] = loop.create_task(worker.supervise(), name=worker.name)

    async def retire(self, workers: list[Worker], grace: float,
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

    async def place(self, worker: Worker) -> Path | None:
        """Put a new worker process into its scope, and watch the scope's pressure."""
        cgroup = await self.placement.place(worker, self.models[worker.model.name].limits)
        if cgroup is not None:
            self.watches.watch_scope(worker.name, cgroup)
        return cgroup

    async def release(self, worker: Worker) -> None:
        self.watches.unwatch_scope(worker.name)
        await self.placement.release(worker)

    async def set_limits(self, name: str, **changes: Any) -> dict[str, Any]:
        """Change a model's worker limits live; the policies hear of it (threads follow
        the new CPU quota)."""
        model = self.models.get(name)
        if model is None:
            raise ProtocolError("no_such_model", f"no model {name!r}")
        new = model.limits.merged(**changes)
        try:
            check_order(new)
        except LimitError as exc:
            raise ProtocolError("bad_request", str(exc)) from None
        await self.placement.apply(model.workers, model.limits, new)
        model.limits = new
        log.info("limits_changed", model=name, **new.describe())
        self.watches.cpu.refresh_caps()
        self.limits_changed(name)
        return new.describe()
