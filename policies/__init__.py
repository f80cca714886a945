"""Resource policies. Built-ins and third-party ones load the same way: through the
entry-point group `llm_residentd.policies`, one class per module, named after its module.
"""

from __future__ import annotations

import importlib.metadata
import traceback

from .base import (
    ACTIONS,
    EVENTS,
    Action,
    Admit,
    CpuRead,
    Defer,
    Event,
    Finished,
    LimitsSet,
    Param,
    Policy,
    PolicyError,
    Preempt,
    Preempted,
    PsiTrigger,
    Queued,
    Rank,
    SetBatch,
    SetLimits,
    SetThreads,
    ShrinkKv,
    Snapshot,
    Started,
    Tick,
    TrimKv,
)

GROUP = "llm_residentd.policies"

__all__ = ["ACTIONS", "EVENTS", "GROUP", "Action", "Admit", "CpuRead", "Defer", "Event",
           "Finished", "LimitsSet", "Param", "Policy", "PolicyError", "Preempt", "Preempted",
           "PsiTrigger", "Queued", "Rank", "SetBatch", "SetLimits", "SetThreads", "ShrinkKv",
           "Snapshot", "Started", "Tick", "TrimKv", "available"]


def available() -> tuple[dict[str, type[Policy]], dict[str, str]]:
    """Policy classes by name, and load errors (with tracebacks) by entry-point name."""
    found: dict[str, type[Policy]] = {}
    errors: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=GROUP):
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Policy)) or cls.name != ep.name:
                raise PolicyError(f"{ep.value} is not a Policy named {ep.name!r}")
            if ep.name in found:
                raise PolicyError(f"two policies are named {ep.name!r}")
            found[ep.name] = cls
        except Exception:
            errors[ep.name] = traceback.format_exc(limit=3)
    return found, errors
