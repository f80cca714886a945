"""Host-side fixtures for the QEMU guest tests: the share directory, a runner that requires a
guest pytest command to pass, and a timings summary.

Environment: LLM_VM_SHARE=DIR keeps the share (run.sh, output.log, serial.log) in DIR;
LLM_VM_TIMEOUT sets the guest timeout in seconds (default 1800).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import guest
import pytest

GUEST_TIMEOUT = float(os.environ.get("LLM_VM_TIMEOUT", "1800"))


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """The directory the guest sees as /share (LLM_VM_SHARE keeps it, with output.log)."""
    path = Path(os.environ.get("LLM_VM_SHARE") or tmp_path / "share")
    path.mkdir(parents=True, exist_ok=True)
    return path


class GuestPytest:
    """Boots the guest on `share` and requires a pytest command there to pass.

    `timings` (seconds per phase) is printed in the terminal summary; tests may add their own.
    """

    def __init__(self, share: Path) -> None:
        self.share = share
        self.timings: dict[str, float] = {}
        self.slowest: list[str] = []  # the guest pytest's --durations lines

    def run(self, command: str, **run_kwargs: Any) -> None:
        t0 = time.monotonic()
        build: dict[str, float] = {}
        try:
            image = guest.ensure_image(build)
        except guest.GuestError as exc:
            pytest.fail(f"no guest image: {exc}")
        self.timings["image"] = time.monotonic() - t0  # 0 when cached
        self.timings.update({f"image.{k}": v for k, v in build.items() if k != "total"})
        try:
            result = guest.run_in_guest(command, self.share, GUEST_TIMEOUT, image=image, **run_kwargs)
        except guest.GuestError as exc:
            pytest.fail(f"guest not started: {exc}")
        self.timings.update(result.phases)
        self.slowest[:] = slowest(result.output)
        # The failures' own lines come first: CI shows the head and tail of a long message.
        details = (f"{result.describe()}\n--- guest failures ---\n{failures(result.output)}\n"
                   f"--- guest pytest output ---\n{result.output}")
        summary = (result.output.strip().splitlines() or [""])[-1]
        assert result.returncode == 0, details
        assert " passed" in summary, details


def failures(output: str, limit: int = 40) -> str:
    """The guest pytest's error lines ("E ..." and the "file.py:N: Error" that locates them),
    at most `limit` of them."""
    picked = [line for line in output.splitlines()
              if line.startswith("E ") or re.match(r"\S+\.py:\d+: \w", line)]
    return "\n".join(picked[:limit]) or "(no error lines)"


def slowest(output: str) -> list[str]:
    """The lines of the guest pytest's "slowest N durations" block (--durations), so that the
    host's summary shows where the guest's time went."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if "slowest" in line
                  and "durations" in line), None)
    if start is None:
        return []
    block = []
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith("="):
            break
        block.append(line.strip())
    return block


@pytest.fixture
def guest_pytest(share: Path, record_property: pytest.RecordProperty) -> GuestPytest:
    runner = GuestPytest(share)
    record_property("vm_timings", runner.timings)  # filled in by the test, printed below
    record_property("vm_slowest", runner.slowest)
    return runner


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the phase timings each vm test recorded with record_property("vm_timings", ...)."""
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            for name, value in getattr(report, "user_properties", []):
                if name == "vm_timings":
                    phases = " ".join(f"{k}={v:.1f}s" for k, v in value.items())
                    terminalreporter.write_line(f"vm timings ({report.nodeid}): {phases}")
                elif name == "vm_slowest" and value:
                    terminalreporter.write_line(f"slowest in the guest ({report.nodeid}):")
                    for line in value:
                        terminalreporter.write_line(f"  {line}")
