"""Models come and go with the memory the machine really has.

A model loads at start or at its first request (`load`), stays loaded for its keep-alive
after its last request, and unloads when asked. Before a load, its memory estimate
(memfit.py) must fit in the room left: idle models are evicted for it, least recently used
first; when only busy ones could make room, the load waits for them; when nothing could,
its requests fail with insufficient_memory. Memory pressure unloads idle models early.

Decisions and bookkeeping are here; the Service (Host) starts and stops the workers.
Every load, unload and eviction is recorded with its reason (`llmctl events`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from ..catalog.config import Config, ModelConfig, cache_bytes
from ..control import procstats
from ..control.records import ModelLoaded, ModelLoadFailed, ModelUnloaded, Recorded
from ..placement.limits import parse_bytes
from ..wire.durations import describe as describe_duration
from ..wire.durations import parse_keep_alive
from ..wire.protocol import ProtocolError
from . import memfit
from .models import Life, Model, Models

if TYPE_CHECKING:
    from ..control.policyengine import PolicyEngine
    from ..placement.scopes import Backend
    from .fleet import Fleet
    from .requests import Request

log = structlog.get_logger()
ON_DEMAND_KEEP_ALIVE = 300.0  # ollama's default keep-alive
LOAD_TIMEOUT = 900.0  # a load holds the others back at most this long
WAIT_POLL_S = 1.0  # a load waiting for busy models looks again at least this often
CACHE_FLOOR = 16 << 20  # a prompt cache this small is emptied at once under memory pressure
CACHE_CALM_S = 60.0  # after this long without a memory trigger, shrunk caches grow back
CACHE_GIVE_BACK_S = 0.5  # a load that emptied other caches looks again after this long


class Host(Protocol):
    """What the lifecycle needs of the Service."""

    config: Config
    fleet: Fleet
    backend: Backend
    engine: PolicyEngine

    async def model_path(self, model: str) -> Path: ...
    def stop_request(self, request_id: str, code: str, message: str) -> Request: ...


class Lifecycle:
    def __init__(self, host: Host, models: Models, clock: Any = time.monotonic) -> None:
        self.host = host
        self.models = models
        self.clock = clock
        self._lock = asyncio.Lock()  # one load decision at a time: their estimates add up
        self._changed = asyncio.Event()  # a model unloaded or went idle: waiting loads look
        for model in models:
            self.add(model.name)
            if self._at_start(model.name):
                # The sockets answer before the backend is up (Service.start): a model that
                # loads at start reads "loading" from the first answer, not "unloaded"
                # (which `llmctl wait` takes for a model that loads on demand).
                model.life.waiting = "the daemon is starting"

    # -- models configured, loaded at start, forgotten -----------------------------

    def add(self, name: str) -> None:
        """A model configured (at start, by a reload, or again): its keep-alive."""
        life = self.models[name].life
        if not life.asked_keep_alive:
            life.keep_alive = self._configured_keep_alive(name)

    def begin(self, name: str) -> None:
        """A model just configured (at start, or added by a reload): load it now if it
        loads at start."""
        if self._at_start(name):
            life = self.models[name].life
            life.waiting = ""
            self._start_load(life, "configured to load at start")

    def close(self) -> None:
        """At shutdown: no load or unload goes on (the service stops every worker)."""
        for model in self.models:
            if model.life.task is not None:
                model.life.task.cancel()

    def _at_start(self, name: str) -> bool:
        model = self.host.config.models.get(name)
        if model is None:
            return False
        first = next(iter(self.host.config.models)) == name
        return model.load == "at_start" or (model.load == "auto" and first)

    def _configured_keep_alive(self, name: str) -> float | None:
        model = self.host.config.models.get(name)
        if model is not None and model.keep_alive:
            return parse_keep_alive(model.keep_alive)
        return None if self._at_start(name) else ON_DEMAND_KEEP_ALIVE

    # -- what the service asks ---------------------------------------------------------

    def loaded(self, name: str) -> bool:
        """Whether the model's workers should run (loading or loaded)."""
        return self.models[name].life.phase in ("loading", "loaded")

    def workers_wanted(self, model: ModelConfig) -> int:
        """How many workers the model should have now: none while it is unloaded."""
        return model.workers if self.loaded(model.name) else 0

    def keep_alive(self, name: str) -> str:
        """The model's keep-alive now, for people: "forever", "5m"."""
        return describe_duration(self.models[name].life.keep_alive)

    def accepted(self, req: Request, keep_alive: str | None) -> None:
        """A request was queued, with its own keep_alive or None."""
        life = self.models[req.model].life
        self._ask_keep_alive(life, keep_alive)
        req.cold = life.state != "loaded"
        if life.state == "loading":
            req.loading()

    def check(self) -> None:
        """On every event and tick: start loads for queued requests, note models that
        came up or went idle, unload those past their keep-alive."""
        now = self.clock()
        for model in self.models:
            life, queue = model.life, model.queue
            if life.state == "unloaded" and queue and life.task is None:
                self._start_load(life, f"a request is waiting ({len(queue)} queued)")
            elif life.state == "loading" and model.state() == "ready":
                self._came_up(life, now)
            elif (life.state == "loading" and life.task is None and not queue
                  and not self._at_start(life.name) and model.state() == "unavailable"):
                # Its requests failed with the reason; retrying with nobody waiting would
                # only burn CPU. The next request loads it again.
                self._start_unload(life, False, "it failed to load: "
                                   + model.unavailable_reason(), "unload")
            if life.state != "loaded":
                continue
            self._grow_caches(model, now)
            if model.busy():
                life.idle_since, life.last_used = None, now
            elif life.idle_since is None:
                life.idle_since = now
                self._changed.set()
            elif (life.keep_alive is not None and now - life.idle_since >= life.keep_alive
                  and life.task is None):
                self._start_unload(life, False, f"idle for {now - life.idle_since:.1f} s, "
                                   f"past its keep_alive {describe_duration(life.keep_alive)}",
                                   "unload")

    def pressure(self, key: str) -> None:
        """A memory PSI trigger fired. The prompt caches give memory back first (each
        trigger halves them; their files stay on disk); once none holds any, unload the
        least recently used idle model that has been idle for daemon.pressure_unload_grace
        and would unload anyway (a keep_alive that is not forever), one per trigger,
        before the kernel reclaims from busy ones."""
        if not key.endswith("/memory") or self._shrink_caches(key):
            return
        # A loaded model with a task is about to unload: one unload per trigger at a time.
        if any(
                life.state == "unloading" or (life.state == "loaded" and life.task is not None)
                for life in self._lives()):
            return
        grace, now = self.host.config.daemon.pressure_unload_grace, self.clock()
        idle = [life for life in self._idle() if life.keep_alive is not None
                and now - (life.idle_since or now) >= grace]
        if idle:
            self._start_unload(idle[0], False, f"memory pressure ({key} PSI trigger); idle "
                               f"{now - (idle[0].idle_since or now):.0f} s", "evict")

    def _shrink_caches(self, key: str) -> bool:
        """Halve every worker's prompt cache in memory (below CACHE_FLOOR: empty it); True
        if any held something. The caches grow back after CACHE_CALM_S without a trigger."""
        now, shrunk = self.clock(), []
        for model in self.models:
            for worker in model.workers:
                held = worker.cache.now.bytes
                if held and worker.state in ("idle", "busy"):
                    limit = held // 2 if held > CACHE_FLOOR else 0
                    worker.set_prompt_cache(limit)
                    model.life.cache_shrunk_at = now
                    shrunk.append(f"{worker.name} {held} -> {limit}")
        if shrunk:
            log.info("prompt_cache_pressure", trigger=key, shrunk=shrunk)
        return bool(shrunk)

    def _grow_caches(self, model: Model, now: float) -> None:
        life = model.life
        if life.cache_shrunk_at is not None and now - life.cache_shrunk_at >= CACHE_CALM_S:
            life.cache_shrunk_at = None
            size = cache_bytes(model.config.prompt_cache, "prompt_cache")  # None: auto
            limit = life.cache_limit if size is None else size
            for worker in model.workers:
                worker.set_prompt_cache(limit)
            log.info("prompt_cache_restored", model=model.name, limit=limit)

    # -- load and unload ----------------------------------------------------------

    def _ask_keep_alive(self, life: Life, keep_alive: str | None) -> None:
        """A request's or a load's keep_alive holds until the model unloads (as ollama's);
        the caller checked it with parse_keep_alive."""
        if keep_alive is not None:
            life.keep_alive, life.asked_keep_alive = parse_keep_alive(keep_alive), True

    async def load(self, name: str, keep_alive: str | None = None) -> Life:
        """Load a model now (llmctl load) and wait until it serves; ProtocolError if it
        cannot (insufficient_memory, model_unavailable)."""
        model = self.models[name]
        life = model.life
        self._ask_keep_alive(life, keep_alive)
        while life.state != "loaded":
            if model.state() == "unavailable":  # its workers failed to load
                raise ProtocolError("model_unavailable", model.unavailable_reason())
            if life.state == "unloaded" and life.task is None:
                self._start_load(life, "asked by llmctl load", explicit=True)
            task = life.task
            if task is not None:
                await asyncio.shield(task)  # raises what the load raised
                if task.done() and not task.cancelled() and task.exception() is None:
                    continue
            elif life.state == "loading":
                await asyncio.sleep(0.05)
                self.check()
        life.idle_since = life.idle_since or self.clock()
        return life

    async def unload(self, name: str, force: bool = False) -> None:
        """Unload a loaded model (llmctl unload): its running requests finish first, or
        with force fail with model_unloaded; queued ones wait and load it again."""
        life = self.models[name].life
        if life.state == "unloaded":
            raise ProtocolError("not_loaded", f"model {name!r} is not loaded")
        while life.state == "loading" and life.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(life.task)
        if life.state in ("loaded", "loading"):
            self._start_unload(life, force, "asked by llmctl unload" + (" --force" if force
                                                                      else ""), "unload")
        if life.task is not None:
            await asyncio.shield(life.task)

    def _start_load(self, life: Life, why: str, explicit: bool = False) -> None:
        life.task = asyncio.get_running_loop().create_task(self._load(life, why, explicit),
                                                           name=f"load-{life.name}")
        life.task.add_done_callback(lambda t: self._task_done(life, t))

    def _start_unload(self, life: Life, force: bool, why: str, kind: str) -> None:
        life.task = asyncio.get_running_loop().create_task(
            self._unload(life, force, why, kind), name=f"unload-{life.name}")
        life.task.add_done_callback(lambda t: self._task_done(life, t))

    def _task_done(self, life: Life, task: asyncio.Task) -> None:
        if life.task is task:
            life.task = None
        if not task.cancelled() and (exc := task.exception()) is not None and not isinstance(
                exc, ProtocolError):
            log.error("lifecycle_failed", model=life.name, error=f"{type(exc).__name__}: {exc}")

    async def _load(self, life: Life, why: str, explicit: bool) -> None:
        name, host = life.name, self.host
        async with self._lock:
            if life.state != "unloaded" or name not in host.config.models:
                return
            target = self.models[name]
            life.state, life.load_started = "loading", self.clock()
            for req in target.queue:
                req.loading()
            model = host.config.models[name]
            try:
                path = await host.model_path(name)
            except Exception:  # its workers fail to load it and say why: status unavailable
                path = None
            try:
                life.need = None if path is None else memfit.estimate(path, model, life.measured)
                victims = [] if life.need is None else await self._make_room(life, explicit)
            except BaseException as exc:
                life.state, life.waiting = "unloaded", ""
                if isinstance(exc, Exception) and not isinstance(exc, ProtocolError):
                    exc = ProtocolError("model_unavailable", str(exc))
                if isinstance(exc, ProtocolError):
                    self._fail_queued(name, exc.code, exc.message)
                    self._record(ModelLoadFailed(name, why), f"failed: {exc}")
                raise exc from None
            if victims is None:  # nobody waits any more
                life.state = "unloaded"
                return
            left = self._room(sum(self._charge(o) for o in self._loaded(life)), 0).bytes
            life.cache_limit = memfit.prompt_cache(model, left - (life.need.bytes if life.need
                                                                  else left))
            workers = [host.fleet.new_worker(model, i, host) for i in range(model.workers)]
            target.workers.extend(workers)
            host.fleet.start(workers)
            self._record(ModelLoaded(name, why, estimate=life.need and life.need.bytes,
                                     evicted=[v.name for v in victims]))
            # Hold the lock until it serves: the next decision then sees its memory.
            deadline = self.clock() + LOAD_TIMEOUT
            while target.state() == "loading" and self.clock() < deadline:
                await asyncio.sleep(0.05)
            if life.state == "loading" and target.state() == "ready":
                self._came_up(life, self.clock())

    async def _make_room(self, life: Life, explicit: bool) -> list[Life] | None:
        """Evict idle models until life's estimate fits; wait while only busy ones could
        make room. The other models' prompt caches go first: if emptying them makes room,
        no model is evicted. None when no request waits for it any more (and nobody asked)."""
        need = life.need
        assert need is not None
        caches_asked = False
        while True:
            fits, victims, room, possible = self._plan(life)
            if (victims or not fits) and not caches_asked and self._caches_make_room(life):
                caches_asked = True
                await asyncio.sleep(CACHE_GIVE_BACK_S)  # the workers free, then we look again
                continue
            if fits:
                for victim in victims:
                    await self._unload(victim, False, f"evicted to make room for {life.name} "
                                       f"(needs {need.describe()}; {room.describe()} free "
                                       "without it)", "evict")
                life.waiting = ""
                return victims
            if not possible:
                raise ProtocolError("insufficient_memory", (
                    f"model {life.name!r} needs about {need.describe()}, but only "
                    f"{self._room_without_others(life).describe()} could be free even with every "
                    "other model unloaded; lower its n_ctx, parallel or workers, or raise "
                    "daemon.memory_budget or the slice's memory limit"))
            busy = ", ".join(v.name for v in self._loaded(life) if self._busy(v))
            life.waiting = (f"waiting for memory: needs {need.describe()}, {room.describe()} "
                            f"free; busy: {busy}")
            if not explicit and not self.models[life.name].queue:
                life.waiting = ""
                return None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), WAIT_POLL_S)

    def _caches_make_room(self, life: Life) -> bool:
        """Empty the other models' prompt caches if that alone makes room for life; True
        if it does (and they were asked)."""
        workers = [w for o in self._loaded(life) for w in self.models[o.name].workers
                   if w.cache.now.bytes and w.state in ("idle", "busy")]
        held = sum(w.cache.now.bytes for w in workers)
        loaded = sum(self._charge(o) for o in self._loaded(life))
        if not held or life.need is None or life.need.bytes > self._room(loaded, 0).bytes + held:
            return False
        now = self.clock()
        for worker in workers:
            worker.set_prompt_cache(0)
            self.models[worker.model.name].life.cache_shrunk_at = now
        log.info("prompt_cache_emptied", to_load=life.name, freed=held,
                 workers=[w.name for w in workers])
        return True

    def _plan(self, life: Life) -> tuple[bool, list[Life], memfit.Room, bool]:
        """(fits, idle models to evict, room after evicting them, could fit at all)."""
        assert life.need is not None
        others = self._loaded(life)
        charges = {o.name: self._charge(o) for o in others}
        loaded = sum(charges.values())
        victims: list[Life] = []
        idle = list(self._idle())
        room = self._room(loaded, 0)
        while life.need.bytes > room.bytes and idle:
            victims.append(idle.pop(0))
            room = self._room(loaded, sum(charges[v.name] for v in victims))
        fits = life.need.bytes <= room.bytes
        possible = fits or life.need.bytes <= self._room(loaded, loaded).bytes
        return fits, victims if fits else [], room, possible

    def _room_without_others(self, life: Life) -> memfit.Room:
        loaded = sum(self._charge(o) for o in self._loaded(life))
        return self._room(loaded, loaded)

    def _room(self, loaded: int, freeable: int) -> memfit.Room:
        daemon = self.host.config.daemon
        return memfit.room(loaded, freeable, self.host.backend.parent,
                           parse_bytes(daemon.memory_budget, "memory_budget"))

    async def _unload(self, life: Life, force: bool, why: str, kind: str) -> None:
        if life.state not in ("loaded", "loading"):
            return
        name, host = life.name, self.host
        life.state = "unloading"
        charge = self._measured(name)
        model = self.models[name]
        workers = list(model.workers)
        if force:
            for worker in workers:
                for req_id in list(worker.running):
                    host.stop_request(req_id, "model_unloaded", f"model {name!r} was unloaded "
                                      "(llmctl unload --force)")
        await host.fleet.retire(workers, host.config.daemon.shutdown_grace)
        for worker in workers:
            if worker in model.workers:
                model.workers.remove(worker)
        life.measured = charge or life.measured
        life.state, life.idle_since, life.loaded_at = "unloaded", None, None
        if life.asked_keep_alive:
            life.asked_keep_alive, life.keep_alive = False, self._configured_keep_alive(name)
        self._record(ModelUnloaded(kind, name, why, memory=charge))
        self._changed.set()

    # -- bookkeeping ------------------------------------------------------------------

    def _came_up(self, life: Life, now: float) -> None:
        life.state, life.loaded_at, life.last_used = "loaded", now, now
        for req in self.models[life.name].queue:
            if req.cold and req.load_s is None:
                req.load_s = now - max(req.accepted_at, life.load_started or now)
        log.info("model_loaded", model=life.name,
                 load_s=round(now - (life.load_started or now), 3))

    def _lives(self) -> list[Life]:
        return [model.life for model in self.models]

    def _busy(self, life: Life) -> bool:
        return self.models[life.name].busy()

    def _loaded(self, but: Life) -> list[Life]:
        return [o for o in self._lives()
                if o is not but and o.state in ("loading", "loaded", "unloading")]

    def _idle(self) -> Iterator[Life]:
        """Loaded idle models, least recently used first."""
        idle = [o for o in self._lives()
                if o.state == "loaded" and not self._busy(o) and o.task is None]
        return iter(sorted(idle, key=lambda o: o.last_used))

    def _charge(self, life: Life) -> int:
        """What a loaded model takes: the larger of its estimate (with its prompt caches
        as they are, not their configured size) and its measured memory."""
        cache = sum(w.cache.now.bytes for w in self.models[life.name].workers)
        estimate = life.need.bytes - life.need.cache + cache if life.need else 0
        return max(estimate, self._measured(life.name))

    def _measured(self, name: str) -> int:
        """Its workers' memory now: anonymous memory of each, plus the model file's
        mapped pages once (the workers share them)."""
        parts = [p for w in self.models[name].workers
                 if w.pid is not None and (p := procstats.rss_parts(w.pid)) is not None]
        return sum(a for a, _ in parts) + max((f for _, f in parts), default=0)

    def _fail_queued(self, name: str, code: str, message: str) -> None:
        for req in list(self.models[name].queue):
            self.host.stop_request(req.id, code, message)

    def _record(self, what: Recorded, result: str = "done") -> None:
        self.host.engine.record("lifecycle", what, result)

    def describe(self, name: str) -> dict[str, Any]:
        """For status and ps."""
        life, now = self.models[name].life, self.clock()
        unload_in = None
        if life.state == "loaded" and life.keep_alive is not None:
            idle_for = now - life.idle_since if life.idle_since is not None else 0.0
            unload_in = max(0.0, life.keep_alive - idle_for)
        return {
            "loaded": life.phase,
            "keep_alive": self.keep_alive(name),
            "keep_alive_s": life.keep_alive,
            "idle_s": None if life.idle_since is None else round(now - life.idle_since, 3),
            "unload_in_s": None if unload_in is None else round(unload_in, 3),
            "loaded_s": None if life.loaded_at is None else round(now - life.loaded_at, 3),
            "memory_bytes": self._measured(name) if life.state != "unloaded" else None,
            "estimate_bytes": life.need.bytes if life.need else None,
            "estimate": life.need.describe() if life.need else None,
            "waiting": life.waiting or None,
        }

