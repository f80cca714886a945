"""What `llmctl events` lists besides the policies' actions: the lifecycle's loads, unloads
and evictions, a policy switched off, a worker's answer to a KV change. Each shows as an
action does: a kind, a target, values and a reason (the engine records them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ..wire import messages

KV_REPORTED = ("tokens_before", "tokens_after", "n_ctx", "rss_before", "rss_after", "ms")


class Recorded(Protocol):
    """Anything the engine records: a policy's action or one of the records below."""

    @property
    def kind(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def values(self) -> dict[str, Any]: ...
    @property
    def reason(self) -> str: ...


@dataclass(frozen=True)
class _Said:
    """A record with nothing to show but its target and reason."""

    target: str
    reason: str

    @property
    def values(self) -> dict[str, Any]:
        return {}


class PolicyDisabled(_Said):
    """A policy (the target) switched off: by an admin, or for raising or returning a bad
    action."""

    kind: ClassVar[str] = "disable"


@dataclass(frozen=True)
class KvReport:
    """A worker's answer to trim_kv or shrink_kv, or a context it grew back for a request
    (grow_kv): its token counts, RSS before and after, and time taken."""

    target: str  # the worker
    report: messages.Kv
    reason: ClassVar[str] = ""

    @property
    def kind(self) -> str:
        return self.report.op

    @property
    def values(self) -> dict[str, Any]:
        values = {k: getattr(self.report, k) for k in KV_REPORTED}
        if self.report.req is not None:
            values["req"] = self.report.req
        return values


@dataclass(frozen=True)
class ModelLoaded:
    """A model's workers started: why, its memory estimate, the idle models evicted for it."""

    target: str  # the model
    reason: str
    estimate: int | None  # bytes; None when its file could not be read
    evicted: list[str]
    kind: ClassVar[str] = "load"

    @property
    def values(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "evicted": self.evicted}


class ModelLoadFailed(_Said):
    """A model (the target) that could not load (the result says why:
    insufficient_memory, ...)."""

    kind: ClassVar[str] = "load"


@dataclass(frozen=True)
class ModelUnloaded:
    """A model's workers stopped: unloaded (asked, idle past its keep-alive, failed to
    load) or evicted (for another model's memory, or under memory pressure)."""

    kind: str  # unload | evict
    target: str  # the model
    reason: str
    memory: int  # bytes its workers held

    @property
    def values(self) -> dict[str, Any]:
        return {"memory": self.memory}
