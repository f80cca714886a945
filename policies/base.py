"""What a policy is: a small class with no I/O that turns events and snapshots into actions.

The daemon feeds each enabled policy the same events (a tick, a PSI trigger, a request
queued / started / finished, limits changed) with a read-only snapshot of the system, and
applies the actions it returns. A policy never opens a file or calls D-Bus, so it can be
tested with a fake clock and scripted snapshots.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import msgspec

from ..wire.schema import Param, Problem, SchemaError

# set_batch's `sequences` that lifts a batch limit: models.NAME.parallel's maximum.
BATCH_UNLIMITED = 64


class PolicyError(ValueError):
    """A policy name, parameter or value that cannot be used; the message says which."""


# as `llmctl policy` and the config's [[policies]] tables have always said it
_WORDING: Mapping[Problem, str] = {
    "kind": "{name} must be {kind}, not {got}",
    "finite": "{name} must be finite",
    "min": "{name} = {value} is below the minimum {limit}",
    "max": "{name} = {value} is above the maximum {limit}",
    "valid": "{name}: {detail}",
}


def check_setting(param: Param, name: str, value: Any) -> Any:
    """A parameter's value from the config or `policy set`, checked against its declaration;
    text (key=value from `llmctl policy set`) is read as the kind first. PolicyError says
    what is wrong."""
    if isinstance(value, str) and param.kind is not str:
        value = _from_text(param, name, value)
    try:
        return param.check(name, value)
    except SchemaError as exc:
        if exc.problem == "valid" and exc.detail.startswith(name):
            raise PolicyError(exc.detail) from None  # parse_cpu and the like name the value
        raise PolicyError(exc.words(_WORDING, kind=exc.param.kind.__name__,
                                    got=type(exc.value).__name__)) from None


def _from_text(param: Param, name: str, text: str) -> Any:
    try:
        if param.kind is bool:
            return {"true": True, "false": False, "1": True, "0": False}[text.lower()]
        return param.kind(text)
    except (KeyError, ValueError):
        raise PolicyError(f"{name}: {text!r} is not a {param.kind.__name__}") from None


# -- what a policy sees ------------------------------------------------------------------


@dataclass(frozen=True)
class Pressure:
    """PSI of one resource: averages in percent, total stall in microseconds."""

    some_avg10: float = 0.0
    full_avg10: float = 0.0
    some_total: int = 0


@dataclass(frozen=True)
class WorkerView:
    name: str
    model: str
    state: str
    threads: int  # what the worker runs now (it confirms each change)
    cpu: float | None  # current quota in CPUs
    memory_high: int | None
    memory_current: int | None
    pressure: dict[str, Pressure] = field(default_factory=dict)
    n_ctx: int = 0  # the context of one sequence it runs with now
    n_ctx_max: int = 0  # the configured context
    threads_asked: int | None = None  # a count sent to the worker, not yet confirmed
    threads_pinned: bool = False  # `threads = N` in the model's config
    allowed_cpus: int = 0  # CPUs in its affinity mask (0: unknown)
    quota: float | None = None  # its cgroup CPU quota in CPUs as the kernel has it
    slots: int = 1  # sequences its process runs at once (models.NAME.parallel)
    slots_busy: int = 0  # requests running on it now
    batch_limit: int = 1  # the most slots dispatch fills: slots, or fewer after set_batch
    prompt_cache_bytes: int = 0  # its prompt cache in memory (the daemon shrinks it first)

    @property
    def free_slots(self) -> int:
        """Slots a queued request of its model can take now."""
        serving = self.state in ("idle", "busy")
        return max(0, self.batch_limit - self.slots_busy) if serving else 0


@dataclass(frozen=True)
class RequestView:
    id: str
    model: str
    priority: int
    prompt_chars: int
    max_tokens: int
    waited_s: float  # since it was accepted
    worker: str = ""  # the worker running it; empty while queued
    tokens: int = 0  # tokens generated so far
    preemptions: int = 0
    deferred: bool = False  # held back by a policy
    kv_cells: int = 0  # KV cells its sequence holds (the worker's last Batch report)


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's threads over the CPU view's window (daemon/control/cpuload.py reads them)."""

    threads: int  # threads the process has now
    running: float  # threads runnable, on average over the recent readings
    cpu: float  # CPUs it used
    wait: float  # its threads waiting for a CPU, on average (schedstat run delay)
    nivcsw: float  # involuntary context switches per second


CPU_TRIGGER_PREFIX = "threads/"


def cpu_trigger_key(scope: str) -> str:
    """A CPU trigger's key: "threads/cpu" for /proc/pressure/cpu, "threads/<worker>" for
    a worker scope's cpu.pressure."""
    return CPU_TRIGGER_PREFIX + scope


@dataclass(frozen=True)
class CpuView:
    """What the CPUs did over the last short window. CPU figures are in CPUs (1.0 = one
    busy CPU); runnable counts are instants averaged over the last few readings."""

    seconds: float  # length of the window
    samples: int  # readings in it
    cpus: int  # CPUs the figures cover (those the workers may use)
    idle: float  # idle CPUs among them
    others_running: float  # runnable tasks that are neither workers nor the daemon's reader
    others_cpu: float  # CPU used by everything but the workers
    stall: float | None  # CPU PSI some of the watched files: fraction of the time
    workers: dict[str, WorkerLoad] = field(default_factory=dict)  # worker name -> its load
    trigger: str = ""  # the key of the CPU trigger behind the last reading; "" if timed

    def total(self, attr: str) -> float:
        return sum(getattr(w, attr) for w in self.workers.values())

    def waited_on_own_scope(self, worker: str) -> bool:
        """The last reading came from a trigger on the worker's own scope: the kernel saw
        its threads wait."""
        return self.trigger == cpu_trigger_key(worker)


@dataclass(frozen=True)
class Snapshot:
    now: float  # the daemon's monotonic clock; a fake one in tests
    system: dict[str, Pressure] = field(default_factory=dict)
    workers: tuple[WorkerView, ...] = ()
    queued: tuple[RequestView, ...] = ()  # waiting requests, in queue order
    running: tuple[RequestView, ...] = ()  # requests on a worker now
    # per resource, the top-level cgroup with the highest some avg10 among those that do
    # not hold the workers: the rest of the machine, without the workers' own throttling
    outside: dict[str, Pressure] = field(default_factory=dict)
    cpu: CpuView | None = None  # the last short window of CPU load; None until two readings

    def neighbour_pressure(self, resource: str) -> float:
        """Some avg10 of the rest of the machine; the system's when that is unknown."""
        pressure = (self.outside or self.system).get(resource)
        return pressure.some_avg10 if pressure else 0.0


# -- what happened: the events a policy is fed ------------------------------------------------


class Event(msgspec.Struct, frozen=True, tag_field="event"):
    """Something happened; the snapshot that comes with it shows the system now."""

    @property
    def kind(self) -> str:
        """Its name, as a policy's `events` lists it."""
        return str(self.__struct_config__.tag)


class Tick(Event, tag="tick"):
    """Every second."""


class CpuRead(Event, tag="cpu"):
    """A new reading of the CPU view (`snap.cpu`): after a CPU PSI trigger, or timed."""


class PsiTrigger(Event, tag="pressure"):
    """A PSI trigger fired: key is `system/cpu`, or `<worker>/<resource>` for a worker's
    scope."""

    key: str


class RequestEvent(Event):
    request: str  # the request's id
    model: str


class Queued(RequestEvent, tag="queued"):
    """A request waits: accepted, or back in the queue after its worker failed."""


class Started(RequestEvent, tag="started"):
    """A request took a slot."""


class Finished(RequestEvent, tag="finished"):
    """A request ended: done, failed, cancelled or timed out."""


class Preempted(RequestEvent, tag="preempted"):
    """A preempted request is back in its queue, in its old place."""


class LimitsSet(Event, tag="limits"):
    """A model's limits changed (a policy's set_limits, or `llmctl limits`)."""

    model: str


EVENTS: tuple[type[Event], ...] = (Tick, CpuRead, PsiTrigger, Queued, Started, Finished,
                                   Preempted, LimitsSet)


# -- what a policy asks for ------------------------------------------------------------------

Tokens = Annotated[int, msgspec.Meta(ge=0, le=1 << 31)]


class Action(msgspec.Struct, frozen=True, tag_field="action", kw_only=True):
    """What a policy asks for. The first field names what it acts on (`target`); the
    others but `reason` are its `values`. `llmctl events` shows them with the kind."""

    reason: str = ""  # keyword-only, after the fields of each action

    @property
    def kind(self) -> str:
        """Its name, as `llmctl events` shows it."""
        return str(self.__struct_config__.tag)

    @property
    def target(self) -> str:
        return getattr(self, self.__struct_fields__[0])

    @property
    def values(self) -> dict[str, Any]:
        """The values given: one left at None is not."""
        return {k: v for k in self.__struct_fields__[1:]
                if k != "reason" and (v := getattr(self, k)) is not None}

    def checked(self) -> Action:
        """The action with its values converted to their declared types; PolicyError, naming
        the value, for one that is not of its type or out of its range."""
        try:
            return msgspec.convert(msgspec.structs.asdict(self), type(self))
        except msgspec.ValidationError as exc:
            what, _, where = str(exc).partition(" - at `$.")
            key = where.rstrip("`")
            raise PolicyError(f"{self.kind} {key}={getattr(self, key, None)!r}: "
                              f"{what[:1].lower()}{what[1:]}") from None


class Admit(Action, tag="admit"):
    """Let a deferred request run."""

    request: str


class Defer(Action, tag="defer"):
    """Hold a waiting request back: it stays queued, in order."""

    request: str


class Rank(Action, tag="rank"):
    """Order a waiting request among those of its priority: the lowest rank runs first
    (too frequent to be recorded)."""

    request: str
    rank: float


class SetLimits(Action, tag="set_limits"):
    """Set a model's worker limits as `llmctl limits` does: cpu a quota (50%, 1.5 or max),
    memory_high a size (600M, bytes or max); a limit not given stays."""

    model: str
    cpu: str | None = None
    memory_high: str | None = None


class SetThreads(Action, tag="set_threads"):
    """Set the threads a worker decodes with."""

    worker: str
    threads: Annotated[int, msgspec.Meta(ge=1, le=1024)]


class Preempt(Action, tag="preempt"):
    """Take a running request out of its worker's batch and queue it again; a context of
    at least state_min_tokens is saved and restored, a shorter one recomputed."""

    request: str
    state_min_tokens: Tokens = 0


class TrimKv(Action, tag="trim_kv"):
    """Drop the middle of a sequence's KV cache on a worker, the one of request req or
    else the longest, keeping its first keep and last tail tokens, if at least min_prune
    can go (a value not given: the worker's default)."""

    worker: str
    keep: Tokens | None = None
    tail: Tokens | None = None
    min_prune: Tokens | None = None
    req: str | None = None


class ShrinkKv(Action, tag="shrink_kv"):
    """Reopen a worker's context with n_ctx tokens per sequence, keeping its sequences
    (a longer one is trimmed first, keeping keep and tail)."""

    worker: str
    n_ctx: Annotated[int, msgspec.Meta(ge=16, le=1 << 31)]
    keep: Tokens | None = None
    tail: Tokens | None = None


class SetBatch(Action, tag="set_batch"):
    """Limit the slots dispatch fills on a worker, or on each worker of a model; the
    maximum (BATCH_UNLIMITED) lifts the limit."""

    model_or_worker: str
    sequences: Annotated[int, msgspec.Meta(ge=1, le=BATCH_UNLIMITED)]


ACTIONS: tuple[type[Action], ...] = (Admit, Defer, Rank, SetLimits, SetThreads, Preempt,
                                     TrimKv, ShrinkKv, SetBatch)


class Policy:
    """Subclass, set name and params, override on_event. The docstring is the manual."""

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    events: ClassVar[frozenset[str] | None] = None  # the event kinds it needs; None: all
    on_by_default: ClassVar[bool] = False  # enabled unless the config says enabled = false

    def __init__(self, **settings: Any) -> None:
        self.settings: dict[str, Any] = {k: p.default for k, p in self.params.items()}
        self.configure(**settings)

    def configure(self, **settings: Any) -> None:
        """Change parameters; all are checked before any is applied."""
        checked = {}
        for key, value in settings.items():
            if key not in self.params:
                known = ", ".join(sorted(self.params)) or "none"
                raise PolicyError(f"policy {self.name} has no parameter {key!r} (known: {known})")
            checked[key] = check_setting(self.params[key], key, value)
        self.check_together({**self.settings, **checked})
        self.settings.update(checked)

    def check_together(self, settings: dict[str, Any]) -> None:
        """Raise PolicyError, naming the keys, for values that are fine alone but not
        together; the settings are not applied then."""

    def on_event(self, event: Event, snap: Snapshot) -> list[Action]:
        return []

    def due(self, event: Event, now: float, interval: float) -> bool:
        """For periodic policies: true on a tick at least interval seconds after the last."""
        last = getattr(self, "_last_due", None)
        if not isinstance(event, Tick) or (last is not None and now - last < interval):
            return False
        self._last_due = now
        return True
