"""Build the Debian packages (`make deb`, lintian clean) and run tests/guest/test_package.py on
them in a real systemd guest: installed with apt from the .deb files, not from the checkout.

Never skips. Environment (and conftest.py's): LLM_VM_PACKAGE_ARGS adds arguments to the guest's
pytest (e.g. "-x").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import guest
import pytest
import tinymodel

pytestmark = pytest.mark.vm

GUEST_COMMAND = ("python3 -m pytest -v --durations=10 -p no:cacheprovider "
                 "/proj/tests/guest/test_package.py "
                 + os.environ.get("LLM_VM_PACKAGE_ARGS", ""))


def build_debs() -> list[Path]:
    """Run `make deb`, which fails on any lintian error or warning; return the two packages."""
    proc = subprocess.run(["make", "-C", str(guest.REPO), "deb"], capture_output=True, text=True,
                          check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"make deb failed ({proc.returncode}):\n{output[-4000:]}"
    debs = sorted((guest.REPO / "dist").glob("llm-residentd*.deb"), key=lambda p: p.name.split("_")[0])
    assert [d.name.split("_")[0] for d in debs] == ["llm-residentd", "llm-residentd-model-smollm2"], debs
    return debs


def test_debian_package_in_guest(share: Path, guest_pytest) -> None:
    t0 = time.monotonic()
    debs = build_debs()
    guest_pytest.timings["make_deb"] = time.monotonic() - t0
    debdir = share / "debs"
    shutil.rmtree(debdir, ignore_errors=True)
    debdir.mkdir()
    for deb in debs:
        shutil.copy(deb, debdir)
    tinymodel.write_tiny_model(share / "tiny.gguf")
    guest_pytest.run(GUEST_COMMAND, env={"LLM_GUEST_SUITE": "package"}, project_wheel=False)
