"""Per-model latency and throughput: a window of samples summarised as percentiles (the
status op), and cumulative histograms and counters since the start (Prometheus)."""

from __future__ import annotations

import bisect
from collections import Counter, deque
from typing import Any

WINDOW = 1000  # most recent requests kept per model
# Histogram upper bounds in seconds: from a short answer's TTFT on a fast CPU (50 ms) to
# a long generation on a slow one (2 min); +Inf is implied.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of values, None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


def summary(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in (50, 95, 99)}


class Histogram:
    """Cumulative counts per upper bound and their sum, as Prometheus histograms keep."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # bounds are inclusive
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs ending with "+Inf" (the total count)."""
        out, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class ModelMetrics:
    """Recent TTFT, latency and tokens/s of one model, plus outcome counters."""

    def __init__(self, window: int = WINDOW) -> None:
        self.ttft: deque[float] = deque(maxlen=window)
        self.latency: deque[float] = deque(maxlen=window)
        self.tokens_per_s: deque[float] = deque(maxlen=window)
        self.outcomes: Counter[str] = Counter()
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.ttft_histogram = Histogram()
        self.latency_histogram = Histogram()

    def record_done(self, stats: dict[str, Any]) -> None:
        self.outcomes["completed"] += 1
        self.completion_tokens += stats.get("completion_tokens", 0)
        self.prompt_tokens += stats.get("prompt_tokens", 0)
        if stats.get("ttft_s") is not None:
            self.ttft.append(stats["ttft_s"])
            self.ttft_histogram.observe(stats["ttft_s"])
        self.latency.append(stats["total_s"])
        self.latency_histogram.observe(stats["total_s"])
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
            "prompt_tokens": self.prompt_tokens,
            "outcomes": dict(self.outcomes),
        }
