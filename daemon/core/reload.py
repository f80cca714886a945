"""Reload the config file on SIGHUP: what changed (diff, pure) and how a running Service
takes it (Reloader), without dropping a request.

- A config with an error is refused as a whole: the old one keeps serving, nothing changes.
- Models added start at once.
- Models removed drain: submits get no_such_model at once, but their running and queued
  requests complete (queued ones too: they were accepted); then their workers stop and their
  scopes are released.
- Models whose load settings changed (path, n_ctx, parallel, workers, threads, ...)
  restart each worker with the new settings once its running requests are done; it takes
  no new one meanwhile. Workers of unchanged models are not touched.
- Live model settings (LIVE_MODEL_FIELDS: the limits, the queue bounds, max_tokens, load,
  keep_alive) apply without
  a restart; limits reach the running scopes as `llmctl limits` does.
- [[policies]]: a changed table re-enables its policy with the new settings, enabled = false
  disables it, a table that is gone returns the policy to its default (on if it is on by
  default, else off). Policies whose table did not change are not touched.
- Daemon keys in LIVE_DAEMON_KEYS apply; the others keep their running values until a
  restart, each logged as reload_needs_restart.

`llmctl models add/remove` (the add_model and remove_model ops) edit the running config
through the same steps (add_model, remove_model below), so a removal drains as above.
What they did lasts until the daemon restarts: a reload merges it into the file
(modeladmin.Overlay): models added stay unless the file now has the name (the file wins,
logged as runtime_model_replaced), names removed stay removed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from .. import notify
from ..catalog import modelsource
from ..catalog.config import Config, ConfigError, DaemonConfig, ModelConfig, limits_of
from ..catalog.modeladmin import Overlay
from ..policies import PolicyError
from ..wire.protocol import ProtocolError, check_model

if TYPE_CHECKING:
    from .service import Service

log = structlog.get_logger()

LIMIT_FIELDS = ("cpu", "memory_high", "memory_max", "tasks_max", "cpu_weight")
LIVE_MODEL_FIELDS = (*LIMIT_FIELDS, "max_queue", "max_queue_per_uid", "max_tokens", "load",
                     "keep_alive")
# Read from service.config at each use; every other daemon key is fixed at start (the
# socket and its listen backlog, the backend, log setup, triggers armed, workers' user...).
LIVE_DAEMON_KEYS = ("hello_timeout", "frame_timeout", "client_buffer", "shutdown_grace",
                    "max_connections_per_uid", "liveness_timeout", "memory_budget",
                    "pressure_unload_grace")
DRAIN_POLL_S = 0.1


@dataclass(frozen=True)
class Diff:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()  # load settings changed: the workers restart
    retuned: dict[str, tuple[str, ...]] = field(default_factory=dict)  # live fields changed
    daemon_live: tuple[str, ...] = ()
    daemon_restart: tuple[str, ...] = ()  # changed, but only a restart applies them
    policies: tuple[str, ...] = ()  # policies whose [[policies]] table changed, came or went

    @property
    def changed(self) -> tuple[str, ...]:
        return tuple(sorted({*self.restarted, *self.retuned}))


def model_changes(old: ModelConfig, new: ModelConfig) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ModelConfig)
                 if getattr(old, f.name) != getattr(new, f.name))


def needs_restart(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether a worker loaded with `old` must restart to serve `new`."""
    return any(k not in LIVE_MODEL_FIELDS for k in model_changes(old, new))


def _policy_tables(config: Config) -> dict[str, dict[str, Any]]:
    return {spec["name"]: dict(spec) for spec in config.policies}


def diff(old: Config, new: Config) -> Diff:
    """What differs between the running config and a newly loaded one."""
    restarted, retuned = [], {}
    for name in sorted(old.models.keys() & new.models.keys()):
        fields = model_changes(old.models[name], new.models[name])
        if any(k not in LIVE_MODEL_FIELDS for k in fields):
            restarted.append(name)
        live = tuple(k for k in fields if k in LIVE_MODEL_FIELDS)
        if live:
            retuned[name] = live
    daemon = [f.name for f in dataclasses.fields(DaemonConfig)
              if getattr(old.daemon, f.name) != getattr(new.daemon, f.name)]
    olds, news = _policy_tables(old), _policy_tables(new)
    return Diff(
        added=tuple(sorted(new.models.keys() - old.models.keys())),
        removed=tuple(sorted(old.models.keys() - new.models.keys())),
        restarted=tuple(restarted), retuned=retuned,
        daemon_live=tuple(k for k in daemon if k in LIVE_DAEMON_KEYS),
        daemon_restart=tuple(k for k in daemon if k not in LIVE_DAEMON_KEYS),
        policies=tuple(sorted(n for n in olds.keys() | news.keys()
                              if olds.get(n) != news.get(n))),
    )


def effective(old: Config, new: Config, d: Diff) -> Config:
    """The new config as it runs: daemon keys that need a restart keep their old values,
    and so does [http] (its sockets are bound at start)."""
    kept = {k: getattr(old.daemon, k) for k in d.daemon_restart}
    if new.http != old.http:
        log.warning("reload_needs_restart", key="http", running=dataclasses.asdict(old.http),
                    configured=dataclasses.asdict(new.http))
    return dataclasses.replace(new, daemon=dataclasses.replace(new.daemon, **kept),
                               http=old.http)


def _check_new_files(old: Config, new: Config, d: Diff, state_dir: Path) -> None:
    """The GGUF of each added model, and of each model whose file changed, is one;
    ModelUnavailable names the key."""
    for name in (*d.added, *d.restarted):
        was, now = old.models.get(name), new.models[name]
        if was is None or (was.path, was.package) != (now.path, now.package):
            modelsource.check(now, state_dir)


def _notify_reloading() -> None:
    # MONOTONIC_USEC: systemd (253+, Type=notify-reload) matches it to the reload it asked for.
    notify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
                  "\nSTATUS=reloading the config")


class Reloader:
    """Reload the config through `load` and apply it to `service`: its models (added,
    retuned, restarted, drained and dropped), their workers (through the fleet) and the
    policies."""

    def __init__(self, service: Service, load: Callable[[], Config],
                 status: Callable[[], str] = lambda: "") -> None:
        self.service = service
        self.load = load
        self.status = status  # STATUS= for systemd after a reload
        self._lock = asyncio.Lock()  # one reload at a time
        self._model_locks: dict[str, asyncio.Lock] = {}  # one drain or restart per model
        self._tasks: set[asyncio.Task] = set()
        self.overlay = Overlay()  # what add_model and remove_model did, kept over reloads
        self.last: dict[str, Any] | None = None  # the last reload, for status
        service.reloader = self  # the add_model and remove_model ops find it here

    async def reload(self) -> bool:
        """Load and apply the config; False when it was refused (the old one serves on)."""
        async with self._lock:
            log.info("reload_requested", config=self.service.config.source)
            _notify_reloading()
            try:
                ok = await self._reload()
            except Exception as exc:  # a bug, not the file: say so, keep serving
                log.exception("reload_failed", error=f"{type(exc).__name__}: {exc}")
                self._record("failed", f"internal error: {type(exc).__name__}: {exc}")
                ok = False
            finally:
                notify.notify(f"READY=1\nSTATUS={self.status()}")
            return ok

    async def _reload(self) -> bool:
        service = self.service
        old = service.config
        try:
            loaded, replaced = self.overlay.merge(self.load())
            d = diff(old, loaded)
            # as --check-config does: a typo in a path is refused, not retried forever
            await asyncio.to_thread(_check_new_files, old, loaded, d, service.state_dir)
        except (ConfigError, modelsource.ModelUnavailable) as exc:
            log.error("reload_failed", error=str(exc), key=_key(str(exc)),
                      config=old.source, serving="the old config")
            self._record("failed", str(exc))
            return False
        self.overlay.forget(replaced)
        for key in d.daemon_restart:
            log.warning("reload_needs_restart", key=f"daemon.{key}",
                        running=getattr(old.daemon, key), configured=getattr(loaded.daemon, key))
        errors = await self._apply(effective(old, loaded, d), d)
        self._record("partial" if errors else "ok", "; ".join(errors), d)
        log.info("reload_applied", added=list(d.added), removed=list(d.removed),
                 changed=list(d.changed), restarted=list(d.restarted),
                 policies=list(d.policies), daemon_applied=list(d.daemon_live),
                 needs_restart=[f"daemon.{k}" for k in d.daemon_restart], errors=errors)
        return True

    async def add_model(self, model: ModelConfig) -> None:
        """Add a checked model (modeladmin.build, check_file) to the running config, as a
        reload that finds it in the file does; model_exists if the name is taken."""
        async with self._lock:
            old = self.service.config
            if model.name in old.models:
                raise ProtocolError("model_exists", f"a model {model.name!r} is configured "
                                    "already (llmctl models remove it first)")
            new = dataclasses.replace(old, models={**old.models, model.name: model})
            await self._apply(new, diff(old, new))
            self.overlay.add(model)

    async def remove_model(self, name: str) -> int:
        """Remove a model from the running config, as a reload that misses it in the file
        does: it takes no new request and drains. Returns its requests still to finish."""
        async with self._lock:
            old = self.service.config
            check_model(name, old.models)
            if len(old.models) == 1:
                raise ProtocolError("bad_request", f"{name!r} is the only model; the daemon "
                                    "serves at least one (add another first)")
            new = dataclasses.replace(old, models={n: m for n, m in old.models.items()
                                                   if n != name})
            await self._apply(new, diff(old, new))
            self.overlay.remove(name)
            model = self.service.models[name]
            return len(model.queue) + model.running

    async def _apply(self, new: Config, d: Diff) -> list[str]:
        """Make `new` the running config; the errors of what could not be applied."""
        service = self.service
        service.config = new  # from here submits see the new set of models
        for model in service.models:  # a removed one drains with the config it had
            model.config = new.models.get(model.name, model.config)
        for name in d.added:
            if (model := service.models.get(name)) is not None:  # removed earlier, draining
                model.reconfigure(new.models[name])
                self._reconcile(name)
            else:
                service.models.add(new.models[name])
                service.lifecycle.add(name)
                service.lifecycle.begin(name)
        for name in (*d.removed, *d.restarted):
            self._reconcile(name)
        return [*await self._retune(new, d), *self._policies(new, d)]

    async def _retune(self, new: Config, d: Diff) -> list[str]:
        """Live model settings: queue bounds, limits (into the running scopes)."""
        errors = []
        for name, fields in d.retuned.items():
            cfg, model = new.models[name], self.service.models[name]
            model.queue.bound(cfg)
            self.service.lifecycle.add(name)  # a new keep_alive, unless a request set one
            for worker in model.workers:
                if not needs_restart(worker.model, cfg):
                    worker.model = cfg
            limits = limits_of(cfg)
            changes = {k: getattr(limits, k) for k in fields if k in LIMIT_FIELDS}
            if not changes:
                continue
            try:
                await self.service.fleet.set_limits(name, **changes)
            except ProtocolError as exc:
                errors.append(f"models.{name}: limits not applied: {exc}")
                log.error("reload_limits_failed", model=name, error=str(exc))
        return errors

    def _policies(self, new: Config, d: Diff) -> list[str]:
        engine, errors = self.service.engine, []
        tables = _policy_tables(new)
        for name in d.policies:
            spec = tables.get(name)
            try:
                if spec is not None and spec.get("enabled", True):
                    engine.enable(name, {k: v for k, v in spec.items()
                                         if k not in ("name", "enabled")})
                elif spec is not None:
                    if name in engine.enabled:
                        engine.disable(name, "enabled = false in the config")
                    engine.disabled[name] = "enabled = false in the config"
                elif (cls := engine.classes.get(name)) is not None and cls.on_by_default:
                    engine.enable(name, {})  # its table is gone: back to the default
                elif name in engine.enabled:
                    engine.disable(name, "no longer in the config")
            except PolicyError as exc:
                errors.append(f"policies ({name}): {exc}")
        return errors

    async def close(self) -> None:
        """At shutdown: stop the drains and restarts in progress (the service stops all)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- removed and restarted models, in the background ---------------------------

    def _reconcile(self, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self._converge(name), name=f"reload-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _converge(self, name: str) -> None:
        """Bring a model's workers in line with the config as it is when each step runs,
        so that a later reload's change wins over an earlier one still in progress."""
        lock = self._model_locks.setdefault(name, asyncio.Lock())
        try:
            async with lock:
                while True:
                    if name in self.service.config.models:
                        await self._restart(name)
                        if name in self.service.config.models:
                            return
                    elif self._drained(name):
                        if await self._drop(name):
                            return
                    else:
                        await asyncio.sleep(DRAIN_POLL_S)
        except Exception:
            log.exception("reload_model_failed", model=name)

    def _drained(self, name: str) -> bool:
        return not self.service.models[name].busy()

    async def _drop(self, name: str) -> bool:
        """Stop a drained model's workers and forget it; False if a reload added it back
        meanwhile (its workers are then started anew by _restart)."""
        service = self.service
        model = service.models[name]
        await service.fleet.retire(list(model.workers), service.config.daemon.shutdown_grace)
        if name in service.config.models:
            model.workers.clear()
            return False
        service.models.drop(name)
        log.info("model_removed", model=name)
        return True

    async def _restart(self, name: str) -> None:
        """Restart, one at a time, each worker whose load settings differ from the config."""
        service, index = self.service, 0
        model = service.models[name]
        workers = model.workers
        while (want := service.config.models.get(name)) is not None:
            # An unloaded model has no workers; the lifecycle starts them when it loads.
            if index >= max(len(workers), service.lifecycle.workers_wanted(want)):
                return
            old = workers[index] if index < len(workers) else None
            if old is not None and not needs_restart(old.model, want):
                old.model = want
                index += 1
                continue
            if old is not None:
                await service.fleet.retire([old], service.config.daemon.shutdown_grace)
                # Removed meanwhile: a replacement still serves the queue while it drains.
                want = service.config.models.get(name) or want
                if index >= service.lifecycle.workers_wanted(want):
                    workers.remove(old)
                    log.info("worker_removed", worker=old.name, reason="config changed")
                    continue
                if (old.model.path, old.model.package) != (want.path, want.package):
                    model.path = None  # another file: resolve it again
            new = service.fleet.new_worker(want, index, service)
            if old is None:
                workers.append(new)
            else:
                workers[index] = new
            service.fleet.start([new])
            log.info("worker_replaced" if old else "worker_added", worker=new.name,
                     reason="config changed")
            index += 1

    def _record(self, result: str, error: str, d: Diff | None = None) -> None:
        d = d or Diff()
        self.last = {
            "at": time.time(), "result": result, "error": error or None,
            "added": list(d.added), "removed": list(d.removed), "changed": list(d.changed),
            "needs_restart": [f"daemon.{k}" for k in d.daemon_restart],
        }


def _key(message: str) -> str | None:
    """The dotted key a ConfigError from config.load names: "PATH: models.x.n_ctx: ..."
    gives models.x.n_ctx; an unreadable file or bad TOML names none."""
    parts = message.split(": ", 2)
    key = parts[1] if len(parts) > 2 else ""
    return key if key and " " not in key else None
