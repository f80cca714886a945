"""Prometheus metrics of a real service serving the tiny model, parsed by real parsers
(prometheus_client's text parser, and promtool where installed), and values that move.

The service runs in this process, with its msgpack server on a socket that llmctl's
Client uses from a thread: the msgpack API has no metrics op (GET /metrics is the HTTP
front's), and render() takes the Service itself.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from harness import tiny_config
from llm_residentd import __version__
from llm_residentd.catalog import config
from llm_residentd.core.service import Service
from llm_residentd.core.wiring import build
from llm_residentd.front.prometheus import CONTENT_TYPE, render
from llm_residentd.front.server import Server
from llmctl import Client
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(service: Service) -> tuple[Samples, bytes]:
    body, content_type = render(service)
    assert content_type == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples, body


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def run_in_service(tmp_path: Path, model: Path,
                   body: Callable[[Service, Path], Awaitable[None]]) -> None:
    cfg = config.parse(tomllib.loads(tiny_config(model)), "test")
    sock = tmp_path / "llm.sock"

    async def main() -> None:
        service = build(cfg, sock)
        server = Server(service, sock)
        await server.start()
        await service.start()
        try:
            await until(lambda: service.models["tiny"].state() == "ready", 120, "the model loads")
            await body(service, sock)
        finally:
            await server.stop_listening()
            service.fail_all()
            await server.close_connections()
            await service.stop()

    asyncio.run(main())


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting until {what}"
        await asyncio.sleep(0.05)


def complete(sock: Path, prompt: str) -> dict[str, Any]:
    """One request through the msgpack API (in a thread): its done event."""
    with Client(sock) as c:
        events = list(c.submit(prompt, max_tokens=6).events())
    assert events[-1]["event"] == "done", events
    return events[-1]


def test_metrics_move_with_requests_and_a_killed_worker(tmp_path, tiny_model_path):
    async def body(service: Service, sock: Path) -> None:
        before, _ = scrape(service)
        ids = {"model": "tiny", "worker": "tiny-0"}
        assert value(before, "llm_residentd_info", version=__version__) == 1
        assert value(before, "llm_residentd_queue_capacity", model="tiny") == 8
        assert value(before, "llm_residentd_queue_depth", model="tiny") == 0
        assert value(before, "llm_residentd_model_state", model="tiny", state="ready") == 1
        assert value(before, "llm_residentd_worker_state", state="idle", **ids) == 1
        assert value(before, "llm_residentd_worker_state", state="busy", **ids) == 0
        assert value(before, "llm_residentd_ttft_seconds_count", model="tiny") == 0
        assert ("llm_residentd_requests_total",
                frozenset({"model": "tiny", "outcome": "completed"}.items())) not in before
        assert value(before, "llm_residentd_worker_threads", why="config", **ids) == 1

        done = await asyncio.to_thread(complete, sock, "hello there")
        stats = done["stats"]
        after, _ = scrape(service)
        assert value(after, "llm_residentd_requests_total", model="tiny",
                     outcome="completed") == 1
        assert value(after, "llm_residentd_completion_tokens_total", model="tiny") == (
            value(before, "llm_residentd_completion_tokens_total", model="tiny")
            + stats["completion_tokens"]) > 0
        assert value(after, "llm_residentd_prompt_tokens_total", model="tiny") == (
            value(before, "llm_residentd_prompt_tokens_total", model="tiny")
            + stats["prompt_tokens"]) > 0
        for hist, seen in (("ttft_seconds", stats["ttft_s"]),
                           ("request_duration_seconds", stats["total_s"])):
            name = f"llm_residentd_{hist}"
            assert value(after, f"{name}_count", model="tiny") == 1
            assert value(after, f"{name}_sum", model="tiny") == seen
            assert value(after, f"{name}_bucket", model="tiny", le="+Inf") == 1
            assert value(after, f"{name}_bucket", model="tiny", le="120.0") == (seen <= 120)
        assert value(after, "llm_residentd_tokens_per_second_p50", model="tiny") > 0
        assert value(after, "llm_residentd_worker_served_total", **ids) == 1
        # The worker's process: its CPU time and faults moved while it loaded and served.
        for name, labels in (("cpu_seconds_total", {"mode": "user"}),
                             ("page_faults_total", {"kind": "minor"}),
                             ("context_switches_total", {"kind": "voluntary"})):
            for process in ("tiny-0", "daemon"):
                assert value(after, f"llm_residentd_process_{name}", process=process,
                             **labels) > 0, (name, process)
        assert value(after, "llm_residentd_process_resident_memory_bytes",
                     process="tiny-0") > 1 << 20

        worker = service.models["tiny"].workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        await until(lambda: worker.restarts == 1 and worker.state == "idle", 120,
                    "the killed worker is back")
        killed, body_text = scrape(service)
        assert value(killed, "llm_residentd_worker_deaths_total", cause="signal", **ids) == 1
        for cause in ("oom", "exit", "hung", "load_failed"):
            assert value(killed, "llm_residentd_worker_deaths_total", cause=cause, **ids) == 0
        assert value(killed, "llm_residentd_worker_restarts_total", **ids) == 1
        # Counters of a new process start again; the model's do not.
        assert value(killed, "llm_residentd_requests_total", model="tiny",
                     outcome="completed") == 1
        promtool(body_text)

    run_in_service(tmp_path, tiny_model_path, body)


def promtool(body: bytes) -> None:
    """`promtool check metrics` (Debian package prometheus; `make test` installs it): the
    body is valid and follows Prometheus' naming rules (it prints the problems it finds)."""
    tool = shutil.which("promtool")
    assert tool is not None, "promtool is missing: make test-tools (apt-get install prometheus)"
    r = subprocess.run([tool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (
        r.returncode, r.stdout, r.stderr)
