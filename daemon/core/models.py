"""One object per model, and the registry of the models the daemon knows.

A Model holds everything the daemon keeps about one model: the config it serves with, its
queue, its worker processes, its limits, latency metrics, its place in the lifecycle, the
batch limit a policy set, and its resolved GGUF file. A model a reload removed stays in
the registry, draining with its last config, until its requests are done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..catalog import modelsource
from ..catalog.config import ModelConfig, limits_of
from ..control.metrics import ModelMetrics
from ..placement.limits import Limits
from ..policies.base import BATCH_UNLIMITED
from . import supervision
from .memfit import Need
from .requests import ModelQueue

if TYPE_CHECKING:
    from .workers import Worker


@dataclass
class Life:
    """A model's place in the lifecycle (lifecycle.py decides; this is its record)."""

    name: str
    state: str = "unloaded"  # unloaded | loading | loaded | unloading
    keep_alive: float | None = None  # seconds idle before it unloads; None: never
    asked_keep_alive: bool = False  # a request or `load` set it (until the model unloads)
    idle_since: float | None = None
    last_used: float = 0.0
    load_started: float | None = None
    loaded_at: float | None = None
    need: Need | None = None
    measured: int | None = None  # what the previous load took when it unloaded: the next
    # estimate (a worker keeps what it allocated while serving, so this is its peak)
    waiting: str = ""  # why a load waits
    task: asyncio.Task | None = None  # the load or unload in progress
    cache_limit: int = 0  # prompt cache bytes per worker, sized at load (memfit.prompt_cache)
    cache_shrunk_at: float | None = None  # memory pressure shrank the caches then

    @property
    def phase(self) -> str:
        """unloaded, loading (also while a load waits for its turn, or for the daemon to
        start), loaded, unloading."""
        if self.state == "unloaded" and (self.task is not None or self.waiting):
            return "loading"
        return self.state


@dataclass(eq=False)
class Model:
    config: ModelConfig  # a removed model drains with the config it last had
    queue: ModelQueue
    limits: Limits
    life: Life
    metrics: ModelMetrics = field(default_factory=ModelMetrics)
    workers: list[Worker] = field(default_factory=list)
    batch_limit: int = BATCH_UNLIMITED  # set_batch on the model: sequences per worker
    path: Path | None = None  # the GGUF file, once resolved
    path_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def of(cls, config: ModelConfig) -> Model:
        return cls(config, ModelQueue(config.name, config.max_queue, config.max_queue_per_uid),
                   limits_of(config), Life(config.name))

    @property
    def name(self) -> str:
        return self.config.name

    def reconfigure(self, config: ModelConfig) -> None:
        """A reload's live settings: queue bounds and limits (the scopes take them apart)."""
        self.config = config
        self.queue.bound(config)
        self.limits = limits_of(config)

    @property
    def running(self) -> int:
        """Requests its workers are running."""
        return sum(len(w.running) for w in self.workers)

    def busy(self) -> bool:
        return bool(self.queue) or any(w.running for w in self.workers)

    def state(self) -> str:
        """ready, loading, unavailable (its workers failed to load), unloaded or unloading:
        the lifecycle's phase, made precise by its workers once they exist."""
        phase = self.life.phase
        if self.workers and phase != "unloading":
            return supervision.model_state(self.workers)
        return phase

    def unavailable_reason(self) -> str:
        """Why its workers fail to load; "" while none fails."""
        return supervision.load_trouble(self.name, self.workers)

    async def resolve_path(self, state_dir: Path) -> Path:
        """The GGUF file, found once (again if it vanished): a package's file may be
        written on first use."""
        async with self.path_lock:
            if self.path is None or not self.path.exists():
                self.path = await asyncio.to_thread(modelsource.resolve, self.config, state_dir)
            return self.path


class Models:
    """The models the daemon knows, in config order: configured ones, then removed ones
    still draining."""

    def __init__(self) -> None:
        self._by_name: dict[str, Model] = {}

    def add(self, config: ModelConfig) -> Model:
        model = self._by_name[config.name] = Model.of(config)
        return model

    def drop(self, name: str) -> None:
        """Forget a removed model whose requests are done and whose workers are retired."""
        model = self._by_name.pop(name, None)
        if model is not None and model.life.task is not None:
            model.life.task.cancel()

    def __getitem__(self, name: str) -> Model:
        return self._by_name[name]

    def get(self, name: str) -> Model | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Model]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        return list(self._by_name)

    def workers(self) -> list[Worker]:
        """Every worker of every model."""
        return [w for model in self._by_name.values() for w in model.workers]

    def worker(self, name: str) -> Worker | None:
        return next((w for w in self.workers() if w.name == name), None)
