"""Feed events to the enabled policies and apply the actions they return; record each one.

A policy that raises, or returns something that is not a list of declared actions with
values in their ranges, is disabled and logged, and the daemon keeps serving with the
others. Admission (admit, defer, rank) is the engine's own state; every other action is
carried out by the Actuator it is given (core/actuator.py), which alone touches workers
and scopes. Each action type has its handler (`_handlers`).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from .. import policies
from ..placement.limits import LimitError, parse_bytes, parse_cpu
from ..policies import Action, Event, Policy, PolicyError, Snapshot
from ..policies.base import Admit, Defer, Preempt, Rank, SetBatch, SetLimits, SetThreads, ShrinkKv, TrimKv
from ..wire import messages
from ..wire.protocol import ProtocolError
from .records import KvReport, PolicyDisabled, Recorded

log = structlog.get_logger()
ACTIONS_KEPT = 500


class Actuator(Protocol):
    """What the engine asks of the daemon: a snapshot, and the actions carried out. Each
    returns the result recorded with the action ("done", "no such worker", ...)."""

    def snapshot(self) -> Snapshot: ...
    def set_threads(self, worker: str, threads: int, why: str) -> str: ...
    async def set_limits(self, model: str, **changes: Any) -> dict[str, Any]: ...
    def preempt(self, request_id: str, state_min_tokens: int) -> str: ...
    def set_batch(self, target: str, sequences: int) -> str: ...
    def kv_op(self, worker: str, kind: str, values: dict[str, Any]) -> str: ...


class PolicyEngine:
    def __init__(self, specs: list[dict[str, Any]], actuator: Actuator | None = None) -> None:
        self.actuator: Actuator = actuator  # type: ignore[assignment]  # bind() when None
        self.classes, self.load_errors = policies.available()
        for name, error in self.load_errors.items():
            log.error("policy_load_failed", policy=name, error=error)
        self.enabled: dict[str, Policy] = {}
        self.disabled: dict[str, str] = {}  # name -> why it was switched off
        self.deferred: set[str] = set()
        self.ranks: dict[str, float] = {}  # request id -> rank within its priority
        self.kv_asked: dict[str, str] = {}  # worker -> the policy whose KV change is pending
        self.actions: collections.deque[dict[str, Any]] = collections.deque(maxlen=ACTIONS_KEPT)
        # Every recorded action since the start, by (policy, kind): the ring forgets.
        self.action_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._handlers: dict[type[Action], Callable[[str, Any], None]] = {
            Admit: self._admit, Defer: self._defer, Rank: self._rank,
            SetLimits: self._set_limits, SetThreads: self._set_threads,
            Preempt: self._preempt, TrimKv: self._kv_op, ShrinkKv: self._kv_op,
            SetBatch: self._set_batch}
        named = {spec["name"] for spec in specs}
        for name, cls in sorted(self.classes.items()):
            if cls.on_by_default and name not in named:
                self.enable(name, {})
        for spec in specs:
            if spec.get("enabled", True):
                self.enable(spec["name"], {k: v for k, v in spec.items()
                                           if k not in ("name", "enabled")})
            else:
                self.disabled[spec["name"]] = "enabled = false in the config"

    def bind(self, actuator: Actuator) -> None:
        """The daemon's side, when it is built after the engine (Service does this)."""
        self.actuator = actuator

    def enable(self, name: str, settings: dict[str, Any]) -> None:
        cls = self.classes.get(name)
        if cls is None:
            known = ", ".join(sorted(self.classes))
            raise PolicyError(f"no policy {name!r} (available: {known})")
        try:
            ok = cls.events is None or (not isinstance(cls.events, str)
                                        and all(isinstance(k, str) for k in cls.events))
        except TypeError:
            ok = False
        if not ok:
            raise PolicyError(f"policy {name}: events must be None or a set of event kinds")
        self.enabled[name] = cls(**settings)
        self.disabled.pop(name, None)
        log.info("policy_enabled", policy=name, **self.enabled[name].settings)

    def configure(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        policy = self.enabled.get(name)
        if policy is None:
            self.enable(name, settings)
        else:
            policy.configure(**settings)
        return dict(self.enabled[name].settings)

    def is_deferred(self, request_id: str) -> bool:
        return request_id in self.deferred

    def rank(self, request_id: str) -> float:
        return self.ranks.get(request_id, 0.0)

    def forget(self, request_id: str) -> None:
        self.deferred.discard(request_id)
        self.ranks.pop(request_id, None)

    # -- events --------------------------------------------------------------------

    def notify(self, event: Event) -> None:
        wanted = [(n, p) for n, p in self.enabled.items()
                  if p.events is None or event.kind in p.events]
        if not wanted:
            return
        snap = self.actuator.snapshot()
        for name, policy in wanted:
            try:
                actions = self._checked(policy.on_event(event, snap))
            except Exception as exc:
                self._disable(name, f"{type(exc).__name__}: {exc}")
                continue
            for action in actions:
                self._handlers[type(action)](name, action)

    def _checked(self, actions: Any) -> list[Action]:
        """The actions as declared (policies/base.py), or PolicyError saying what is not."""
        if not isinstance(actions, list):
            raise PolicyError(f"on_event returned {type(actions).__name__}, not a list")
        for a in actions:
            if type(a) not in self._handlers:
                kinds = ", ".join(cls.__name__ for cls in self._handlers)
                raise PolicyError(f"on_event returned {a!r}, not an action ({kinds})")
        return [a.checked() for a in actions]

    def disable(self, name: str, why: str) -> None:
        """Switch a policy off (an admin's `llmctl policy disable`); what it did stays."""
        if name not in self.enabled:
            raise PolicyError(f"policy {name} is not enabled")
        self.enabled.pop(name)
        self.disabled[name] = why
        log.info("policy_disabled", policy=name, reason=why)
        self.record(name, PolicyDisabled(name, why), "done")

    def _disable(self, name: str, why: str) -> None:
        self.enabled.pop(name, None)
        self.disabled[name] = why
        log.error("policy_disabled", policy=name, error=why)
        self.record(name, PolicyDisabled(name, why), "done")

    # -- the actions, one handler each ------------------------------------------------

    def _admit(self, name: str, action: Admit) -> None:
        if action.request in self.deferred:
            self.deferred.discard(action.request)
            self.record(name, action, "done")

    def _defer(self, name: str, action: Defer) -> None:
        if action.request not in self.deferred:
            self.deferred.add(action.request)
            self.record(name, action, "done")

    def _rank(self, name: str, action: Rank) -> None:
        self.ranks[action.request] = action.rank  # too frequent to record

    def _set_threads(self, name: str, action: SetThreads) -> None:
        self.record(name, action, self.actuator.set_threads(
            action.worker, action.threads, f"{action.reason} ({name})"))

    def _set_limits(self, name: str, action: SetLimits) -> None:
        asyncio.get_running_loop().create_task(self._apply_limits(name, action))

    async def _apply_limits(self, name: str, action: SetLimits) -> None:
        try:
            changes = {}
            if action.cpu is not None:
                changes["cpu"] = parse_cpu(action.cpu)
            if action.memory_high is not None:
                changes["memory_high"] = parse_bytes(action.memory_high, "memory_high")
            await self.actuator.set_limits(action.model, **changes)
            result = "done"
        except (ProtocolError, LimitError) as exc:
            result = f"failed: {exc}"
        self.record(name, action, result)

    def _preempt(self, name: str, action: Preempt) -> None:
        self.record(name, action, self.actuator.preempt(action.request,
                                                        action.state_min_tokens))

    def _set_batch(self, name: str, action: SetBatch) -> None:
        result = self.actuator.set_batch(action.model_or_worker, action.sequences)
        if result != "unchanged":  # a policy may repeat it every tick
            self.record(name, action, result)

    def _kv_op(self, name: str, action: TrimKv | ShrinkKv) -> None:
        if action.worker in self.kv_asked:  # one at a time per worker
            return
        result = self.actuator.kv_op(action.worker, action.kind, action.values)
        if result == "asked":
            self.kv_asked[action.worker] = name
        self.record(name, action, result)

    def kv_reported(self, worker: str, report: messages.Kv) -> None:
        """The worker's answer to a trim_kv or shrink_kv, recorded for its policy."""
        name = self.kv_asked.pop(worker, "(none)") if report.asked else "(worker)"
        self.record(name, KvReport(worker, report), report.result)

    def record(self, name: str, what: Recorded, result: str) -> None:
        """One entry of `llmctl events`, counted for policy_actions_total."""
        entry = {"at": time.time(), "policy": name, "action": what.kind,
                 "target": what.target, "values": what.values, "reason": what.reason,
                 "result": result}
        self.actions.append(entry)
        self.action_counts[name, what.kind] += 1
        log.info("policy_action", **entry)

    def describe(self) -> dict[str, Any]:
        return {
            "available": {n: c.__module__ for n, c in sorted(self.classes.items())},
            "enabled": {n: p.settings for n, p in self.enabled.items()},
            "disabled": dict(self.disabled),
            "load_errors": dict(self.load_errors),
            "deferred": sorted(self.deferred),
        }
