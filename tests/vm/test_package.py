"""Build the Debian packages (`make deb`, lintian clean) and run tests/guest/test_package.py on
them in a real systemd guest: installed with apt from the .deb files, not from the checkout.

Never skips. Environment: LLM_VM_SHARE=DIR keeps the share; LLM_VM_PACKAGE_ARGS adds arguments to
the guest's pytest (e.g. "-x").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import guest
import pytest
import tinymodel

pytestmark = pytest.mark.vm

GUEST_COMMAND = ("python3 -m pytest -v -p no:cacheprovider /proj/tests/guest/test_package.py "
                 + os.environ.get("LLM_VM_PACKAGE_ARGS", ""))
GUEST_TIMEOUT = float(os.environ.get("LLM_VM_TIMEOUT", "1800"))
LINTIAN_TAG = re.compile(r"^([EWIPXO]): (\S+)", re.M)


def build_debs() -> tuple[list[Path], str]:
    """Run `make deb`; return the two packages and make's output (lintian's tags are in it)."""
    proc = subprocess.run(["make", "-C", str(guest.REPO), "deb"], capture_output=True, text=True,
                          check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"make deb failed ({proc.returncode}):\n{output[-4000:]}"
    debs = sorted((guest.REPO / "dist").glob("llm-residentd*.deb"), key=lambda p: p.name.split("_")[0])
    assert [d.name.split("_")[0] for d in debs] == ["llm-residentd", "llm-residentd-model-smollm2"], debs
    return debs, output


def test_debian_package_in_guest(share: Path, record_property: pytest.RecordProperty) -> None:
    timings: dict[str, float] = {}
    record_property("vm_timings", timings)
    t0 = time.monotonic()
    debs, make_output = build_debs()
    timings["make_deb"] = time.monotonic() - t0
    tags = LINTIAN_TAG.findall(make_output)
    assert not [t for t in tags if t[0] in "EW"], f"lintian errors or warnings:\n{make_output[-4000:]}"
    try:
        image = guest.ensure_image()
    except guest.GuestError as exc:
        pytest.fail(f"no guest image: {exc}")
    debdir = share / "debs"
    shutil.rmtree(debdir, ignore_errors=True)
    debdir.mkdir()
    for deb in debs:
        shutil.copy(deb, debdir)
    tinymodel.write_tiny_model(share / "tiny.gguf")
    try:
        result = guest.run_in_guest(GUEST_COMMAND, share, GUEST_TIMEOUT, image=image,
                                    env={"LLM_GUEST_SUITE": "package"}, project_wheel=False)
    except guest.GuestError as exc:
        pytest.fail(f"guest not started: {exc}")
    timings.update(result.phases)
    details = f"{result.describe()}\n--- guest pytest output ---\n{result.output}"
    summary = (result.output.strip().splitlines() or [""])[-1]
    assert result.returncode == 0, details
    assert " passed" in summary, details
