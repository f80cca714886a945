"""Guest-side fixtures. These tests need root, systemd as PID 1 and cgroup2: run them via tests/vm."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_GUEST = os.environ.get("LLM_GUEST") == "1"
# LLM_GUEST_SUITE=package (tests/vm/test_package.py): only test_package.py, which installs the .deb;
# otherwise everything else, run from the project wheel.
PACKAGE_SUITE = os.environ.get("LLM_GUEST_SUITE") == "package"
# Outside the guest (LLM_GUEST unset) collect nothing: `pytest tests/guest` then exits 5, never "passes".
if not IN_GUEST:
    collect_ignore_glob = ["*"]
elif PACKAGE_SUITE:
    collect_ignore = [f.name for f in Path(__file__).parent.glob("test_*.py") if f.name != "test_package.py"]
else:
    collect_ignore_glob = ["test_package.py"]


def pytest_report_header() -> str:
    return f"llm guest: LLM_GUEST={os.environ.get('LLM_GUEST')!r} share={os.environ.get('LLM_GUEST_SHARE')}"


@pytest.fixture(scope="session")
def share() -> Path:
    return Path(os.environ.get("LLM_GUEST_SHARE", "/share"))


@pytest.fixture(scope="session")
def tiny_model(share: Path) -> Iterator[Path]:
    """The host-generated tiny GGUF, copied to /dev/shm (loading over 9p is slow)."""
    src = Path(os.environ.get("LLM_TEST_MODEL", share / "tiny.gguf"))
    assert src.is_file(), f"{src} missing: the host stages it (tests/vm/test_guest_suite.py)"
    dst = Path("/dev/shm") / src.name
    shutil.copyfile(src, dst)
    yield dst
    dst.unlink(missing_ok=True)
