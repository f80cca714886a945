"""Run tests/guest inside a real systemd guest (QEMU/TCG) and require it to pass.

Never skips: missing tools, a failed image build or a guest that does not boot all fail here.
Environment: LLM_VM_SHARE=DIR keeps the share (run.sh, output.log, serial.log) in DIR;
LLM_VM_TIMEOUT sets the guest timeout in seconds (default 900); LLM_VM_PYTEST_ARGS adds arguments
to the guest's pytest, e.g. "-k smoke" or "-x".
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import guest
import pytest
import tinymodel

pytestmark = pytest.mark.vm

GUEST_COMMAND = "python3 -m pytest -v -p no:cacheprovider /proj/tests/guest " + os.environ.get(
    "LLM_VM_PYTEST_ARGS", "")
GUEST_TIMEOUT = float(os.environ.get("LLM_VM_TIMEOUT", "1800"))


def test_guest_suite_passes(share: Path, record_property: pytest.RecordProperty) -> None:
    timings: dict[str, float] = {}
    record_property("vm_timings", timings)  # filled in below, printed in the terminal summary
    t0 = time.monotonic()
    build: dict[str, float] = {}
    try:
        image = guest.ensure_image(build)
    except guest.GuestError as exc:
        pytest.fail(f"no guest image: {exc}")
    timings["image"] = time.monotonic() - t0  # 0 when cached
    timings.update({f"image.{k}": v for k, v in build.items() if k != "total"})
    tinymodel.write_tiny_model(share / "tiny.gguf")
    # A wide model with a long context, so that its KV cache dominates (test_kv_trim.py).
    tinymodel.write_tiny_model(share / "kv.gguf", n_layer=2, n_embd=256, n_ff=256,
                               n_ctx_train=32768)
    try:
        result = guest.run_in_guest(GUEST_COMMAND, share, GUEST_TIMEOUT, image=image)
    except guest.GuestError as exc:
        pytest.fail(f"guest not started: {exc}")
    timings.update(result.phases)
    details = f"{result.describe()}\n--- guest pytest output ---\n{result.output}"
    returncode, summary = result.returncode, (result.output.strip().splitlines() or [""])[-1]
    assert returncode == 0, details
    assert " passed" in summary, details
