"""Feed events to the enabled policies and apply the actions they return; record each one.

A policy that raises, or returns something that is not a list of known actions, is
disabled and logged, and the daemon keeps serving with the others. Admission (admit,
defer, rank) is the engine's own state; every other action is carried out by the
Actuator it is given (core/actuator.py), which alone touches workers and scopes.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Protocol

import structlog

from .. import policies
from ..placement.limits import LimitError, parse_bytes, parse_cpu
from ..policies import Action, Event, Policy, PolicyError, Snapshot
from ..wire import messages
from ..wire.protocol import ProtocolError

log = structlog.get_logger()
ACTIONS_KEPT = 500
KINDS = ("admit", "defer", "rank", "set_limits", "set_threads", "preempt", "trim_kv",
         "shrink_kv", "set_batch")
# The integer values each worker-side action takes, with their bounds.
INT_VALUES = {
    "set_threads": {"threads": (1, 1024)},
    "preempt": {"state_min_tokens": (0, 1 << 31)},
    "trim_kv": {"keep": (0, 1 << 31), "tail": (0, 1 << 31), "min_prune": (0, 1 << 31)},
    "shrink_kv": {"n_ctx": (16, 1 << 31), "keep": (0, 1 << 31), "tail": (0, 1 << 31)},
    "set_batch": {"sequences": (1, policies.base.BATCH_UNLIMITED)},  # the maximum lifts it
}
# The string values they take besides: trim_kv's `req` names the sequence to trim.
STR_VALUES = {"trim_kv": ("req",)}


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
                actions = policy.on_event(event, snap)
                self._check(actions)
            except Exception as exc:
                self._disable(name, f"{type(exc).__name__}: {exc}")
                continue
            for action in actions:
                self._apply(name, action, snap)

    def _check(self, actions: Any) -> None:
        if not isinstance(actions, list):
            raise PolicyError(f"on_event returned {type(actions).__name__}, not a list")
        for a in actions:
            if not isinstance(a, Action) or a.kind not in KINDS:
                raise PolicyError(f"on_event returned {a!r}, not an Action of {KINDS}")
            allowed = INT_VALUES.get(a.kind, {})
            for key, value in a.values.items() if allowed else ():
                if key in STR_VALUES.get(a.kind, ()) and isinstance(value, str):
                    continue
                low, high = allowed.get(key, (None, None))
                if low is None or not isinstance(value, int) or not low <= value <= high:
                    raise PolicyError(f"{a.kind} {key}={value!r}: takes integers "
                                      f"{', '.join(allowed)} in range")
            if a.kind == "set_batch" and "sequences" not in a.values:
                raise PolicyError(f"{a!r}: set_batch needs sequences")

    def disable(self, name: str, why: str) -> None:
        """Switch a policy off (an admin's `llmctl policy disable`); what it did stays."""
        if name not in self.enabled:
            raise PolicyError(f"policy {name} is not enabled")
        self.enabled.pop(name)
        self.disabled[name] = why
        log.info("policy_disabled", policy=name, reason=why)
        self.record(name, Action("disable", name, reason=why), "done")

    def _disable(self, name: str, why: str) -> None:
        self.enabled.pop(name, None)
        self.disabled[name] = why
        log.error("policy_disabled", policy=name, error=why)
        self.record(name, Action("disable", name, reason=why), "done")

    def _apply(self, name: str, action: Action, snap: Snapshot) -> None:
        if action.kind in ("admit", "defer"):
            was = action.target in self.deferred
            (self.deferred.add if action.kind == "defer" else self.deferred.discard)(action.target)
            if was != (action.kind == "defer"):
                self.record(name, action, "done")
        elif action.kind == "rank":
            self.ranks[action.target] = float(action.values["rank"])  # too frequent to record
        elif action.kind == "set_threads":
            self.record(name, action, self.actuator.set_threads(
                action.target, action.values["threads"], f"{action.reason} ({name})"))
        elif action.kind == "set_limits":
            asyncio.get_running_loop().create_task(self._set_limits(name, action))
        elif action.kind == "preempt":
            self.record(name, action, self.actuator.preempt(
                action.target, action.values.get("state_min_tokens", 0)))
        elif action.kind == "set_batch":
            result = self.actuator.set_batch(action.target, action.values["sequences"])
            if result != "unchanged":  # a policy may repeat it every tick
                self.record(name, action, result)
        elif action.target not in self.kv_asked:  # trim_kv, shrink_kv: one at a time
            result = self.actuator.kv_op(action.target, action.kind, action.values)
            if result == "asked":
                self.kv_asked[action.target] = name
            self.record(name, action, result)

    def kv_reported(self, worker: str, report: messages.Kv) -> None:
        """The worker's answer to a trim_kv or shrink_kv, recorded for its policy."""
        name = self.kv_asked.pop(worker, "(none)") if report.asked else "(worker)"
        values = {k: getattr(report, k) for k in ("tokens_before", "tokens_after", "n_ctx",
                                                  "rss_before", "rss_after", "ms")}
        if report.req is not None:
            values["req"] = report.req
        self.record(name, Action(report.op, worker, values), report.result)

    async def _set_limits(self, name: str, action: Action) -> None:
        try:
            changes = {}
            if "cpu" in action.values:
                changes["cpu"] = parse_cpu(str(action.values["cpu"]))
            if "memory_high" in action.values:
                changes["memory_high"] = parse_bytes(str(action.values["memory_high"]),
                                                     "memory_high")
            await self.actuator.set_limits(action.target, **changes)
            result = "done"
        except (ProtocolError, LimitError) as exc:
            result = f"failed: {exc}"
        self.record(name, action, result)

    def record(self, name: str, action: Action, result: str) -> None:
        entry = {"at": time.time(), "policy": name, "action": action.kind,
                 "target": action.target, "values": action.values, "reason": action.reason,
                 "result": result}
        self.actions.append(entry)
        self.action_counts[name, action.kind] += 1
        log.info("policy_action", **entry)

    def describe(self) -> dict[str, Any]:
        return {
            "available": {n: c.__module__ for n, c in sorted(self.classes.items())},
            "enabled": {n: p.settings for n, p in self.enabled.items()},
            "disabled": dict(self.disabled),
            "load_errors": dict(self.load_errors),
            "deferred": sorted(self.deferred),
        }
