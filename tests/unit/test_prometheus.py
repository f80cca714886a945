"""The Prometheus collector's shape over a crafted status (scopes, PSI, policies: what a
host without cgroups cannot show), the histograms, worker deaths by cause, process
readings, and docs/metrics.md."""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from llm_residentd.catalog.config import ModelConfig
from llm_residentd.control import procstats
from llm_residentd.control.metrics import Histogram, ModelMetrics
from llm_residentd.core.workers import LoadFailed, Worker
from llm_residentd.front import prometheus
from prometheus_client.parser import text_string_to_metric_families

PSI = {"some": {"avg10": 12.5, "avg60": 1.0, "avg300": 0.5, "total": 2_500_000},
       "full": {"avg10": 2.0, "avg60": 0.0, "avg300": 0.0, "total": 500_000}}


def _worker_status(**over: Any) -> dict[str, Any]:
    w = {"name": "m-0", "model": "m", "state": "busy", "restarts": 2, "served": 7,
         "threads": 3, "threads_why": "quota: 3.0 CPUs (threads)",
         "deaths": {"oom": 1, "hung": 1},
         "rss_bytes": 1000, "cpu_user_s": 1.5, "cpu_system_s": 0.25, "cpu_percent": 90.0,
         "minor_faults": 10, "major_faults": 2, "ctx_switches_voluntary": 5,
         "ctx_switches_involuntary": 6,
         "slots": 4, "slots_busy": 3, "batch_limit": 4,
         "batch": {"steps": 100, "tokens": 350, "sequences": 290, "size": 2.9},
         "prompt_cache": {"entries": 3, "bytes": 3000, "limit": 8000, "disk_entries": 5,
                          "disk_bytes": 9000, "disk_limit": 20000, "disk_error": None,
                          "hits": 4, "disk_hits": 1, "misses": 6, "tokens_reused": 700,
                          "restore_s": 0.25, "saved": 5, "evicted": 2},
         "requests": [{"id": "r1", "tokens": 5, "kv_cells": 300},
                      {"id": "r2", "tokens": 1, "kv_cells": 40},
                      {"id": "r3", "tokens": 0, "kv_cells": None}],
         "cgroup": {"cpu.max": "150000 100000", "memory.high": "max",
                    "memory.max": "1073741824", "memory.current": 5000,
                    "cpu.stat": {"throttled_usec": 3_500_000, "nr_throttled": 4},
                    "memory.events": {"high": 9, "max": 1, "oom": 1, "oom_kill": 1, "low": 0},
                    "pressure": {"cpu": PSI, "memory": None, "io": {"some": PSI["some"]}}}}
    return {**w, **over}


def _status() -> dict[str, Any]:
    summary = {"p50": None, "p95": None, "p99": None}
    return {
        "daemon": {"uptime_s": 12.5},
        "models": {"m": {"state": "ready", "queue_depth": 3, "max_queue": 8, "running": 1,
                         "outcomes": {"completed": 4, "too_long": 1}, "completion_tokens": 40,
                         "prompt_tokens": 30, "tokens_per_s": {**summary, "p50": 55.5}}},
        "workers": [_worker_status(),
                    _worker_status(name="m-1", state="restarting", threads_why=None,
                                   cgroup=None, deaths={}, slots=0, slots_busy=0,
                                   batch_limit=0, requests=[],
                                   **dict.fromkeys(procstats.FIELDS))],
        "pressure": {"system": {"cpu": PSI, "memory": PSI, "io": None},
                     "outside": {"cpu": PSI}, "triggers": {"system/cpu": 3}},
    }


def _scrape(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[tuple, float], bytes]:
    metrics = ModelMetrics()
    metrics.record_done({"ttft_s": 0.05, "total_s": 3.0, "completion_tokens": 1})
    engine = SimpleNamespace(action_counts={("threads", "set_threads"): 2,
                                            ("static", "set_limits"): 1})
    service = SimpleNamespace(models={"m": SimpleNamespace(metrics=metrics)}, engine=engine)
    monkeypatch.setattr(prometheus.views, "status", lambda s: _status())
    body, content_type = prometheus.render(service)  # type: ignore[arg-type]
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out, body


def _get(samples: dict[tuple, float], name: str, **labels: str) -> float:
    return samples[("llm_residentd_" + name, *sorted(labels.items()))]


def test_every_declared_family_is_rendered_with_its_type(monkeypatch):
    _, body = _scrape(monkeypatch)
    text = body.decode()
    for name, d in prometheus.METRICS.items():
        assert f"# TYPE {prometheus.PREFIX}{name} {d.type}\n" in text, name


def test_scope_pressure_and_policy_series(monkeypatch):
    s, _ = _scrape(monkeypatch)
    w = {"model": "m", "worker": "m-0"}
    assert _get(s, "scope_cpu_max_cpus", **w) == 1.5
    assert _get(s, "scope_memory_high_bytes", **w) == math.inf
    assert _get(s, "scope_memory_max_bytes", **w) == 1 << 30
    assert _get(s, "scope_memory_current_bytes", **w) == 5000
    assert _get(s, "scope_cpu_throttled_seconds_total", **w) == 3.5
    assert _get(s, "scope_cpu_throttled_periods_total", **w) == 4
    assert _get(s, "scope_memory_events_total", event="oom_kill", **w) == 1
    assert _get(s, "scope_memory_events_total", event="high", **w) == 9
    assert ("llm_residentd_scope_memory_events_total", *sorted({**w, "event": "low"}.items())) \
        not in s  # only the documented events
    assert _get(s, "pressure_avg10_ratio", scope="m-0", resource="cpu", kind="some") == 0.125
    assert _get(s, "pressure_stall_seconds_total", scope="m-0", resource="io",
                kind="some") == 2.5
    assert _get(s, "pressure_avg10_ratio", scope="system", resource="memory", kind="full") == 0.02
    assert _get(s, "pressure_stall_seconds_total", scope="system", resource="cpu",
                kind="full") == 0.5
    assert _get(s, "pressure_avg10_ratio", scope="outside", resource="cpu", kind="some") == 0.125
    assert not any(k[0] == "llm_residentd_pressure_stall_seconds_total"
                   and ("scope", "outside") in k for k in s)
    assert _get(s, "pressure_trigger_events_total", trigger="system/cpu") == 3
    assert _get(s, "policy_actions_total", policy="threads", kind="set_threads") == 2
    # The worker without a scope or a process has no such series.
    assert not any(("worker", "m-1") in k for k in s if "_scope_" in k[0])
    assert not any(("process", "m-1") in k for k in s)


def test_model_and_worker_series(monkeypatch):
    s, _ = _scrape(monkeypatch)
    assert _get(s, "requests_total", model="m", outcome="too_long") == 1
    assert _get(s, "queue_depth", model="m") == 3 and _get(s, "running_requests", model="m") == 1
    assert _get(s, "tokens_per_second_p50", model="m") == 55.5
    assert _get(s, "prompt_tokens_total", model="m") == 30
    assert _get(s, "ttft_seconds_bucket", model="m", le="0.05") == 1  # bounds are inclusive
    assert _get(s, "request_duration_seconds_bucket", model="m", le="2.5") == 0
    assert _get(s, "request_duration_seconds_bucket", model="m", le="5.0") == 1
    assert _get(s, "request_duration_seconds_sum", model="m") == 3.0
    w = {"model": "m", "worker": "m-0"}
    assert _get(s, "worker_state", state="busy", **w) == 1
    assert _get(s, "worker_state", state="idle", **w) == 0
    assert _get(s, "worker_state", state="restarting", model="m", worker="m-1") == 1
    assert _get(s, "worker_threads", why="quota", **w) == 3
    assert _get(s, "worker_threads", why="none", model="m", worker="m-1") == 3
    assert _get(s, "worker_deaths_total", cause="oom", **w) == 1
    assert _get(s, "worker_deaths_total", cause="signal", **w) == 0
    assert _get(s, "worker_deaths_total", cause="load_failed", model="m", worker="m-1") == 0
    assert _get(s, "process_cpu_seconds_total", process="m-0", mode="system") == 0.25
    assert _get(s, "process_page_faults_total", process="m-0", kind="major") == 2
    assert _get(s, "process_context_switches_total", process="m-0", kind="involuntary") == 6
    assert _get(s, "process_resident_memory_bytes", process="daemon") > 0


def test_slots_batch_counters_and_kv_cells_per_worker(monkeypatch):
    """Issue 14: busy and free slots, the batch counters whose rates give the mean batch
    size, and the KV cells of the running sequences."""
    s, _ = _scrape(monkeypatch)
    w = {"model": "m", "worker": "m-0"}
    assert _get(s, "worker_slots", state="busy", **w) == 3
    assert _get(s, "worker_slots", state="free", **w) == 1
    assert _get(s, "worker_batch_steps_total", **w) == 100
    assert _get(s, "worker_batch_tokens_total", **w) == 350
    assert _get(s, "worker_batch_sequences_total", **w) == 290
    assert _get(s, "worker_kv_cells", **w) == 340
    assert not any(k[0] == "llm_residentd_worker_slots" and ("worker", "m-1") in k for k in s)


def test_prompt_cache_series_per_worker(monkeypatch):
    """Issue 22: what the prompt cache holds where, its lookups by result, tokens reused."""
    s, _ = _scrape(monkeypatch)
    w = {"model": "m", "worker": "m-0"}
    assert _get(s, "worker_prompt_cache_entries", where="memory", **w) == 3
    assert _get(s, "worker_prompt_cache_bytes", where="disk", **w) == 9000
    assert _get(s, "worker_prompt_cache_limit_bytes", where="memory", **w) == 8000
    assert _get(s, "worker_prompt_cache_lookups_total", result="hit_memory", **w) == 3
    assert _get(s, "worker_prompt_cache_lookups_total", result="hit_disk", **w) == 1
    assert _get(s, "worker_prompt_cache_lookups_total", result="miss", **w) == 6
    assert _get(s, "worker_prompt_cache_tokens_reused_total", **w) == 700
    assert _get(s, "worker_prompt_cache_restore_seconds_total", **w) == 0.25


def test_histogram_buckets_are_cumulative_and_inclusive():
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 3.0):
        h.observe(v)
    assert h.buckets() == [("1.0", 2), ("2.0", 3), ("+Inf", 4)] and h.sum == 6.0


def test_model_metrics_count_prompt_tokens_and_fill_the_histograms():
    m = ModelMetrics(window=1)
    for i in range(3):
        m.record_done({"ttft_s": 0.2, "total_s": 1.0 + i, "completion_tokens": 2,
                       "prompt_tokens": 5})
    m.record_done({"ttft_s": None, "total_s": 0.1, "completion_tokens": 0, "prompt_tokens": 5})
    assert m.snapshot()["prompt_tokens"] == 20
    assert m.ttft_histogram.buckets()[-1] == ("+Inf", 3)  # no TTFT without a token
    assert m.latency_histogram.buckets()[-1] == ("+Inf", 4)  # beyond the window of 1


def test_docs_metrics_md_is_generated_from_the_declarations():
    path = Path(__file__).parents[2] / "docs" / "metrics.md"
    assert path.read_text() == prometheus.markdown(), (
        "docs/metrics.md is stale: python -m llm_residentd.front.prometheus > docs/metrics.md")


# -- process readings ---------------------------------------------------------------------

def test_faults_are_read_after_a_name_with_spaces_and_parentheses(tmp_path):
    fields = ["S", "1", "2", "3", "4", "5", "6", "111", "8", "222"] + ["0"] * 40
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text("42 (a) (b c) " + " ".join(fields) + "\n")
    assert procstats.faults(42, tmp_path) == (111, 222)
    assert procstats.faults(43, tmp_path) is None


def test_sampler_gives_cpu_percent_between_readings():
    now = [1000.0]
    sampler = procstats.Sampler(clock=lambda: now[0])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        first = sampler.read(busy.pid)
        assert set(first) == set(procstats.FIELDS) and first["rss_bytes"] > 0
        assert first["minor_faults"] > 0 and first["ctx_switches_involuntary"] is not None
        time.sleep(0.6)  # the child burns real CPU time meanwhile
        now[0] += 0.3
        assert sampler.read(busy.pid)["cpu_percent"] == first["cpu_percent"]  # too soon
        now[0] += 0.3
        second = sampler.read(busy.pid)
        used = second["cpu_user_s"] + second["cpu_system_s"] - first["cpu_user_s"] \
            - first["cpu_system_s"]
        assert used > 0.2
        assert second["cpu_percent"] == pytest.approx(100 * used / 0.6, abs=0.1)
    finally:
        busy.kill()
        busy.wait()
    assert sampler.read(busy.pid) == dict.fromkeys(procstats.FIELDS)  # gone
    assert sampler.read(None) == dict.fromkeys(procstats.FIELDS)


# -- how workers died ---------------------------------------------------------------------

class FakeProc:
    def __init__(self, code: int) -> None:
        self.pid, self.returncode = 4242, code

    async def wait(self) -> int:
        return self.returncode


class ReapListener:
    def __init__(self, oom: bool) -> None:
        self.oom = oom

    def oom_killed(self, worker: Worker) -> bool:
        return self.oom


@pytest.mark.parametrize(("code", "oom", "hung", "cause"), [
    (-signal.SIGKILL, False, "", "signal"),
    (-signal.SIGSEGV, False, "", "signal"),
    (-signal.SIGKILL, True, "", "oom"),
    (1, False, "", "exit"),
    (-signal.SIGKILL, False, "killed: no heartbeat", "hung"),
])
def test_reap_names_the_cause(code, oom, hung, cause):
    worker = Worker(ModelConfig(name="m", path="/m.gguf"), 0, ReapListener(oom), 30.0)  # type: ignore[arg-type]
    worker._proc, worker._hung = FakeProc(code), hung  # type: ignore[assignment]
    asyncio.run(worker._reap())
    assert worker._ended == cause


def test_supervise_counts_deaths_but_not_a_stop():
    class Listener:
        def worker_idle(self, worker: Worker) -> None:
            pass

        def worker_load_failed(self, worker: Worker) -> None:
            pass

    async def sleep(delay: float) -> None:
        pass

    worker = Worker(ModelConfig(name="m", path="/m.gguf"), 0, Listener(), 30.0, sleep=sleep)  # type: ignore[arg-type]
    lives = iter(["signal", "load", "exit", "load-oom", "stop"])

    async def spawn_and_load() -> object:
        worker._life = next(lives)  # type: ignore[attr-defined]
        if worker._life.startswith("load"):  # type: ignore[attr-defined]
            raise LoadFailed("bad magic")
        return object()

    async def serve(reader: object) -> None:
        if worker._life == "stop":  # type: ignore[attr-defined]
            worker._stopping = True

    async def reap() -> str:
        life = worker._life  # type: ignore[attr-defined]
        worker._ended = {"load": "exit", "stop": "exit", "load-oom": "oom"}.get(life, life)
        return ""

    worker._spawn_and_load, worker._serve, worker._reap = spawn_and_load, serve, reap  # type: ignore[method-assign]
    asyncio.run(asyncio.wait_for(worker.supervise(), 5))
    want = {"signal": 1, "load_failed": 1, "exit": 1, "oom": 1}  # not the stop
    assert worker.deaths == want and worker.describe()["deaths"] == want
