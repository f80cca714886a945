"""After the daemon is killed, a new one leaves no stale scope (runs after the scope tests'
daemon has stopped: one daemon owns the slice)."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from guestlib import CGROUP, MODEL_SRC, SLICE, GuestDaemon, config, llm_scopes


@pytest.fixture
def model() -> Path:
    dst = Path("/dev/shm") / MODEL_SRC.name
    shutil.copy(MODEL_SRC, dst)
    return dst


def test_no_stale_scope_after_the_daemon_is_killed(tmp_path, model):
    d = GuestDaemon(tmp_path / "a", config(model)).start()
    assert "llm-tiny-0.scope" in llm_scopes()
    d.stop(signal.SIGKILL)
    d2 = GuestDaemon(tmp_path / "b", config(model)).start()
    try:
        w = d2.worker("tiny-0")
        assert llm_scopes() == ["llm-tiny-0.scope"]
        cgroup = CGROUP / SLICE / "llm-tiny-0.scope"
        assert (cgroup / "cgroup.procs").read_text().split() == [str(w["pid"])]
    finally:
        d2.stop()
