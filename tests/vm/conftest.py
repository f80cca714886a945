"""Host-side fixtures for the QEMU guest tests: the `vm` marker and a timings summary."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the phase timings each vm test recorded with record_property("vm_timings", ...)."""
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            for name, value in getattr(report, "user_properties", []):
                if name == "vm_timings":
                    phases = " ".join(f"{k}={v:.1f}s" for k, v in value.items())
                    terminalreporter.write_line(f"vm timings ({report.nodeid}): {phases}")
