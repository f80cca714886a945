"""Host-side fixtures for the QEMU guest tests: the share directory and a timings summary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """The directory the guest sees as /share (LLM_VM_SHARE keeps it, with output.log)."""
    path = Path(os.environ.get("LLM_VM_SHARE") or tmp_path / "share")
    path.mkdir(parents=True, exist_ok=True)
    return path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the phase timings each vm test recorded with record_property("vm_timings", ...)."""
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            for name, value in getattr(report, "user_properties", []):
                if name == "vm_timings":
                    phases = " ".join(f"{k}={v:.1f}s" for k, v in value.items())
                    terminalreporter.write_line(f"vm timings ({report.nodeid}): {phases}")
