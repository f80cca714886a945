"""Per-model latency and throughput samples, summarised as percentiles."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

WINDOW = 1000  # most recent requests kept per model


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of values, None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


def summary(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in (50, 95, 99)}


class ModelMetrics:
    """Recent TTFT, latency and tokens/s of one model, plus outcome counters."""

    def __init__(self, window: int = WINDOW) -> None:
        self.ttft: deque[float] = deque(maxlen=window)
        self.latency: deque[float] = deque(maxlen=window)
        self.tokens_per_s: deque[float] = deque(maxlen=window)
        self.outcomes: Counter[str] = Counter()
        self.completion_tokens = 0

    def record_done(self, stats: dict[str, Any]) -> None:
        self.outcomes["completed"] += 1
        self.completion_tokens += stats.get("completion_tokens", 0)
        if stats.get("ttft_s") is not None:
            self.ttft.append(stats["ttft_s"])
        self.latency.append(stats["total_s"])
        if stats.get("tokens_per_s"):
            self.tokens_per_s.append(stats["tokens_per_s"])

    def record_outcome(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "ttft_s": summary(list(self.ttft)),
            "latency_s": summary(list(self.latency)),
            "tokens_per_s": summary(list(self.tokens_per_s)),
            "samples": len(self.latency),
            "completion_tokens": self.completion_tokens,
            "outcomes": dict(self.outcomes),
        }
