"""Smoke tests: the guest really has what llm-residentd relies on (systemd, cgroup2, PSI, llama.cpp).

They assert on what the kernel and systemd report, so a broken image fails here first.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pystemd.dbusexc import DBusBaseError
from pystemd.systemd1 import Manager, Unit

CGROUP_ROOT = Path("/sys/fs/cgroup")
SCOPE = b"llm-smoke-test.scope"
SLICE = b"llm.slice"
MIB = 1024 * 1024


def mounts() -> dict[str, str]:
    """Mount point -> filesystem type, from /proc/self/mountinfo."""
    table = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        table[fields[4]] = fields[sep + 1]
    return table


def test_pid1_is_systemd() -> None:
    assert Path("/proc/1/comm").read_text().strip() == "systemd"


def test_cgroup2_unified_with_cpu_and_memory() -> None:
    table = mounts()
    assert table.get(str(CGROUP_ROOT)) == "cgroup2"
    assert "cgroup" not in table.values(), "a cgroup v1 hierarchy is mounted"
    controllers = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
    assert {"cpu", "memory"} <= set(controllers)


def test_psi_trigger_registers_on_proc_pressure_cpu() -> None:
    fd = os.open("/proc/pressure/cpu", os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(fd, b"some 150000 1000000\0")
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        events = poller.poll(200)  # an event may or may not come; registering is what counts
        assert not any(ev & (select.POLLERR | select.POLLNVAL) for _, ev in events), events
    finally:
        os.close(fd)


def test_psi_rejects_a_malformed_trigger() -> None:
    fd = os.open("/proc/pressure/cpu", os.O_RDWR | os.O_NONBLOCK)
    try:
        with pytest.raises(OSError):
            os.write(fd, b"some 150000 100\0")  # window below the 500 ms minimum
    finally:
        os.close(fd)


# ---------------------------------------------------------------- pystemd transient scope


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def unit_state(name: bytes) -> bytes:
    with Unit(name) as unit:
        return unit.Unit.ActiveState


def scope_cgroup(name: bytes) -> Path:
    with Unit(name) as unit:
        return CGROUP_ROOT / unit.Scope.ControlGroup.decode().lstrip("/")


def start_transient_scope(props: dict[bytes, Any]) -> None:
    """StartTransientUnit, retried while systemd still holds the previous test's stopped scope."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with Manager() as manager:
                manager.Manager.StartTransientUnit(SCOPE, b"fail", props)
            return
        except DBusBaseError:  # "Unit ... was already loaded": retry; anything else fails at the deadline
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def scope() -> Iterator[tuple[Path, int]]:
    """llm-smoke-test.scope in llm.slice holding a sleeping child: CPUQuota 25 %, MemoryHigh 64 MiB."""
    child = subprocess.Popen(["sleep", "300"])
    props = {
        b"Description": b"llm-residentd guest smoke test",
        b"Slice": SLICE,
        b"CPUQuotaPerSecUSec": 250_000,
        b"MemoryHigh": 64 * MIB,
        b"_custom": (b"PIDs", b"au", [child.pid]),
    }
    try:
        start_transient_scope(props)
        assert wait_for(lambda: unit_state(SCOPE) == b"active"), unit_state(SCOPE)
        yield scope_cgroup(SCOPE), child.pid
    finally:
        child.kill()
        child.wait()
        wait_for(lambda: unit_state(SCOPE) in (b"inactive", b"failed"))
        if unit_state(SCOPE) == b"failed":
            with Manager() as manager:
                manager.Manager.ResetFailedUnit(SCOPE)


def test_scope_gets_limits_and_the_pid(scope: tuple[Path, int]) -> None:
    cgroup, pid = scope
    assert cgroup == CGROUP_ROOT / "llm.slice" / "llm-smoke-test.scope"
    assert str(pid) in (cgroup / "cgroup.procs").read_text().split()
    assert (cgroup / "cpu.max").read_text().split() == ["25000", "100000"]
    assert int((cgroup / "memory.high").read_text()) == 64 * MIB


def test_set_unit_properties_changes_cpu_max_live(scope: tuple[Path, int]) -> None:
    cgroup, _ = scope
    with Manager() as manager:
        manager.Manager.SetUnitProperties(SCOPE, True, {b"CPUQuotaPerSecUSec": 500_000})
    assert wait_for(lambda: (cgroup / "cpu.max").read_text().split() == ["50000", "100000"], 5.0), (
        (cgroup / "cpu.max").read_text())
    with Unit(SCOPE) as unit:
        assert unit.Scope.CPUQuotaPerSecUSec == 500_000


# ---------------------------------------------------------------- Python packages


def test_llama_cpp_generates_from_the_tiny_model(tiny_model: Path) -> None:
    import llama_cpp  # imported here so a broken wheel fails this test only

    llm = llama_cpp.Llama(model_path=str(tiny_model), n_ctx=128, n_threads=1, verbose=False)
    try:
        out = llm("the quick brown fox", max_tokens=8, temperature=0.0)
    finally:
        llm.close()
    assert out["usage"]["completion_tokens"] >= 1
    assert out["choices"][0]["text"].strip()
    assert out["choices"][0]["finish_reason"] == "length"


def test_project_imports_from_the_staged_wheel() -> None:
    import llm_residentd
    import llmctl

    for module in (llm_residentd, llmctl):
        assert module.__file__ is not None
        assert module.__file__.startswith("/opt/llm-residentd/site/"), module.__file__


@pytest.mark.parametrize("tool", ["llmctl", "llm-residentd"])
def test_entry_point_wrappers_run(tool: str) -> None:
    proc = subprocess.run([tool, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
