"""Resource limits of a worker: parsed from text ("50%", "600M", "max"), checked, shown."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

PAGE = 4096
MIN_CPU = 0.01  # 1 % of one CPU
MIN_MEMORY = 16 << 20
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class LimitError(ValueError):
    """A limit that cannot be used; the message names it and says what is allowed."""


@dataclass(frozen=True)
class Limits:
    cpu: float | None = None  # CPUs (0.5 = half of one CPU); None is no quota
    memory_high: int | None = None  # bytes; None is no limit
    memory_max: int | None = None
    tasks_max: int | None = None
    cpu_weight: int = 100

    def merged(self, **changes: object) -> Limits:
        return replace(self, **{k: v for k, v in changes.items() if v is not ...})

    def describe(self) -> dict[str, object]:
        return {"cpu": format_cpu(self.cpu), "memory_high": format_bytes(self.memory_high),
                "memory_max": format_bytes(self.memory_max),
                "tasks_max": self.tasks_max if self.tasks_max is not None else "max",
                "cpu_weight": self.cpu_weight}


def parse_cpu(text: str, ncpu: int | None = None) -> float | None:
    """'50%' (of one CPU), '1.5' (CPUs) or 'max' into CPUs, None for no quota."""
    ncpu = ncpu or os.cpu_count() or 1
    value = text.strip().lower()
    if value in ("max", "infinity", "none"):
        return None
    try:
        cpus = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise LimitError(f"cpu {text!r}: use a percentage of one CPU like 50%, a number "
                         "of CPUs like 1.5, or max") from None
    if not MIN_CPU <= cpus <= ncpu:
        raise LimitError(f"cpu {text!r}: must be between {MIN_CPU * 100:g}% and "
                         f"{ncpu * 100}% ({ncpu} CPUs), or max")
    return cpus


def parse_bytes(text: str, what: str) -> int | None:
    """'600M', '1G', '1048576' or 'max' into bytes (rounded down to 4 KiB), None for no limit."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    if value in ("MAX", "INFINITY", "NONE"):
        return None
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        n = int(float(value[: len(value) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise LimitError(f"{what} {text!r}: use a size like 600M, 2G or 1073741824, "
                         "or max") from None
    if n < MIN_MEMORY:
        raise LimitError(f"{what} {text!r}: must be at least {MIN_MEMORY >> 20}M, or max")
    return n // PAGE * PAGE


def format_cpu(cpus: float | None) -> str:
    return "max" if cpus is None else f"{cpus * 100:g}%"


def format_bytes(n: int | None) -> str:
    if n is None:
        return "max"
    for unit in ("G", "M", "K"):
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def cpu_max_line(cpus: float | None, period_us: int = 100_000) -> str:
    """The cgroup v2 cpu.max text for a quota in CPUs."""
    return f"max {period_us}" if cpus is None else f"{round(cpus * period_us)} {period_us}"


def check_order(limits: Limits) -> None:
    high, hard = limits.memory_high, limits.memory_max
    if high is not None and hard is not None and high > hard:
        raise LimitError(f"memory_high {format_bytes(high)} is above memory_max "
                         f"{format_bytes(hard)}")
