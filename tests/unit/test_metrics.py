from __future__ import annotations

from llm_residentd.control.metrics import ModelMetrics, percentile


def test_nearest_rank_percentile():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 95) == 95
    assert percentile(values, 99) == 99 and percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def test_model_metrics_snapshot():
    m = ModelMetrics(window=3)
    for i in range(5):
        m.record_done({"ttft_s": i, "total_s": 10 + i, "tokens_per_s": 100 + i,
                       "completion_tokens": 2})
    m.record_outcome("cancelled")
    snap = m.snapshot()
    assert snap["samples"] == 3 and snap["ttft_s"]["p50"] == 3  # window keeps the last three
    assert snap["outcomes"] == {"completed": 5, "cancelled": 1}
    assert snap["completion_tokens"] == 10
