"""Prometheus metrics under real systemd and cgroup2 (run inside the guest as root): CPU
hogs move the scope's throttling and PSI, and the system's and outside PSI, as scraped.

The service runs in this process (render() takes the Service; the msgpack API has no
metrics op), with the systemd backend: its worker gets a real scope.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import tomllib
from pathlib import Path

from guestlib import CGROUP, SLICE, config
from llm_residentd.catalog import config as daemon_config
from llm_residentd.core.service import Service
from llm_residentd.core.wiring import build
from llm_residentd.front.prometheus import render
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
HOG_S = 8


def scrape(service: Service) -> Samples:
    body, _ = render(service)
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[("llm_residentd_" + name, frozenset(labels.items()))]


def test_hogs_move_throttling_and_pressure(tiny_model: Path, tmp_path: Path) -> None:
    text = config(tiny_model, cpu="20%").replace("[daemon]\n", '[daemon]\nbackend = "systemd"\n', 1)
    cfg = daemon_config.parse(tomllib.loads(text), "guest test")

    async def main() -> tuple[Samples, Samples]:
        service = build(cfg, tmp_path / "unused.sock")
        await service.start()
        try:
            deadline = time.monotonic() + 240
            while service.models["tiny"].state() != "ready":
                assert time.monotonic() < deadline, "the model did not load"
                await asyncio.sleep(0.2)
            before = scrape(service)
            scope = CGROUP / SLICE / "llm-tiny-0.scope"
            inside = subprocess.Popen(["sh", "-c", f"echo $$ > {scope}/cgroup.procs && exec "
                                       f"stress-ng --quiet --cpu 2 --timeout {HOG_S}s"])
            # Outside every worker scope (this test's own service): more runnable tasks
            # than CPUs, so tasks there stall too.
            outside = subprocess.Popen(["stress-ng", "--quiet", "--cpu", "4",
                                        "--timeout", f"{HOG_S}s"])
            try:
                await asyncio.sleep(HOG_S - 1)
                during = scrape(service)
            finally:
                for hog in (inside, outside):
                    hog.kill()
                    hog.wait()
            return before, during
        finally:
            await service.stop()

    before, during = asyncio.run(main())
    w = {"model": "tiny", "worker": "tiny-0"}
    assert get(during, "scope_cpu_max_cpus", **w) == 0.2
    assert get(during, "scope_memory_current_bytes", **w) > 1 << 20
    for name in ("scope_cpu_throttled_seconds_total", "scope_cpu_throttled_periods_total"):
        assert get(during, name, **w) > get(before, name, **w), name
    for scope in ("tiny-0", "system"):
        ids = {"scope": scope, "resource": "cpu", "kind": "some"}
        assert get(during, "pressure_stall_seconds_total", **ids) > get(
            before, "pressure_stall_seconds_total", **ids), scope
        assert get(during, "pressure_avg10_ratio", **ids) > 0, scope
    assert get(during, "pressure_avg10_ratio", scope="outside", resource="cpu", kind="some") > 0
    assert get(during, "process_cpu_seconds_total", process="tiny-0", mode="user") > 0
