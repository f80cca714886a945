"""What the status and models ops show: read-only views of a running Service."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..control import psi
from ..core import memfit
from ..wire import messages
from ..wire.protocol import PROTOCOL_VERSION

if TYPE_CHECKING:
    from ..core.models import Model
    from ..core.service import Service
    from ..core.workers import Worker


def model_state(service: Service, name: str) -> str:
    """As Model.state, and "draining" for a model a reload removed that still finishes
    its requests."""
    return "draining" if name not in service.config.models else service.models[name].state()


def status(service: Service) -> dict[str, Any]:
    return {
        "daemon": {
            "version": __version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - service.started_at, 3),
            "socket": str(service.socket_path), "config": service.config.source,
            "backend": service.backend.name, "stopping": service.stopping,
            "reload": service.reloader.last if service.reloader else None,
        },
        "workers": [_describe_worker(service, w) for w in service.models.workers()],
        "pressure": {
            "system": psi.system_pressure(),
            "outside": service.observer.outside(),
            "triggers": service.watches.counts,
            "recent": list(service.watches.events)[-20:],
        },
        "cpu": service.watches.cpu.describe(),
        "models": {
            model.name: {
                "state": model_state(service, model.name),
                "queue_depth": len(model.queue), "max_queue": model.queue.limit,
                "running": model.running,
                "slots": sum(w.slots for w in model.workers if w.state in ("idle", "busy")),
                "queued": [r.id for r in model.queue.ordered(service.engine.rank)],
                "prompt_cache": prompt_cache(model.workers),
                **kv_cache(model),
                **service.lifecycle.describe(model.name),
                **model.metrics.snapshot(),
            }
            for model in service.models
        },
    }


def _describe_worker(service: Service, worker: Worker) -> dict[str, Any]:
    out = worker.describe()
    out["batch_limit"] = service.slots.limit(worker)
    out["backend"] = service.backend.name
    out["limits"] = service.models[worker.model.name].limits.describe()
    out["cgroup"] = service.observer.cgroup_stats(worker.scope.cgroup if worker.scope else None)
    counts = service.watches.counts
    out["pressure_events"] = sum(counts.get(f"{worker.name}/{r}", 0) for r in psi.RESOURCES)
    return out


def models(service: Service) -> list[dict[str, Any]]:
    """The configured models in config order (the first is the default), then those a
    reload removed that are still draining."""
    out = []
    # A removed model drains with its workers' config; one with no worker left is gone.
    draining = [m.name for m in service.models if m.name not in service.config.models
                and m.workers]
    for name in [*service.config.models, *draining]:
        model = service.models[name]
        cfg, workers = model.config, model.workers
        out.append({
            "name": name, "state": model_state(service, name),
            "source": cfg.package or cfg.path,
            "path": str(model.path) if model.path is not None else None,
            "workers": cfg.workers, "parallel": cfg.parallel, "n_ctx": cfg.n_ctx,
            "max_tokens": cfg.max_tokens, "load": cfg.load,
            "keep_alive": service.lifecycle.keep_alive(name),
            "adapters": _adapters(cfg.adapters, workers),
            "error": model.unavailable_reason() or None,
        })
    return out


def loaded_model(service: Service, name: str) -> dict[str, Any]:
    """A model in memory, for ps and load."""
    model = service.models[name]
    workers = model.workers
    return {
        "name": name, "state": model_state(service, name),
        **kv_cache(model),
        **service.lifecycle.describe(name),
        "workers": len(workers), "pids": [w.pid for w in workers if w.pid is not None],
        "slots": sum(w.slots for w in workers if w.serving),
        "slots_busy": model.running,
        "prompt_cache": prompt_cache(workers),
    }


def prompt_cache(workers: list[Worker]) -> dict[str, Any]:
    """The model's prompt cache: its workers' figures summed (each worker has a cache and
    a directory of its own), and the first disk error one reports."""
    each = [w.cache.describe() for w in workers]
    out: dict[str, Any] = {k: 0 for k in messages.CacheStats.__struct_fields__}
    for c in each:
        for k, v in c.items():
            if k != "disk_error":
                out[k] += v
    out["restore_s"] = round(out["restore_s"], 6)
    out["disk_error"] = next((c["disk_error"] for c in each if c["disk_error"]), None)
    return out


def kv_cache(model: Model) -> dict[str, Any]:
    """The model's KV cache types and the bytes of one cell (all layers, K and V) in them,
    from its GGUF's header; null until its file is found, or if the header lacks a count."""
    cfg = model.config
    cell = memfit.kv_cell_bytes(model.path, cfg) if model.path is not None else None
    return {"cache_type_k": cfg.cache_type_k, "cache_type_v": cfg.cache_type_v,
            "kv_cell_bytes": cell}


def _adapters(adapters: dict[str, str], workers: list[Worker]) -> dict[str, dict[str, Any]]:
    """Each LoRA adapter's file, and why it failed to load if a worker said so."""
    return {name: {"path": path, "error": adapter_error(workers, name)}
            for name, path in adapters.items()}


def adapter_error(workers: list[Worker], name: str) -> str | None:
    """Why llama.cpp refused adapter `name`, if a worker of the model said so (they all
    load the same file, so one says it for all)."""
    return next((w.adapter_errors[name] for w in workers if name in w.adapter_errors), None)
