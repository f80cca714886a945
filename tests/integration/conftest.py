"""Fixtures that start real daemons with the tiny generated model."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Daemon, tiny_config


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator:
    """Start daemons with a given config; all are stopped at the end of the test."""
    daemons: list[Daemon] = []

    def start(config: str | None, wait: bool = True, name: str = "d", socket: Path | None = None) -> Daemon:
        d = Daemon(tmp_path / f"{name}{len(daemons)}", config, socket)
        daemons.append(d)
        return d.start(wait)

    yield start
    for d in daemons:
        try:
            d.stop(timeout=15)
        except subprocess.TimeoutExpired:
            d.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def tiny_daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[Daemon]:
    """One daemon with the tiny model shared by a module's tests (n_ctx 256, 1 worker).
    Floods of connections come from one uid here, so it has no per-uid limit to speak of."""
    d = Daemon(tmp_path_factory.mktemp("tinyd"),
               tiny_config(tiny_model_path, daemon="max_connections_per_uid = 65536"))
    d.start()
    yield d
    d.stop()
