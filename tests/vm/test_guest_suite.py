"""Run tests/guest inside a real systemd guest (QEMU/TCG) and require it to pass.

Never skips: missing tools, a failed image build or a guest that does not boot all fail here.
Environment (and conftest.py's): LLM_VM_PYTEST_ARGS adds arguments to the guest's pytest,
e.g. "-k smoke" or "-x".
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tinymodel

pytestmark = pytest.mark.vm

GUEST_COMMAND = "python3 -m pytest -v --durations=15 -p no:cacheprovider /proj/tests/guest " + os.environ.get(
    "LLM_VM_PYTEST_ARGS", "")


def test_guest_suite_passes(share: Path, guest_pytest) -> None:
    tinymodel.write_tiny_model(share / "tiny.gguf")
    # A wide model with a long context, so that its KV cache dominates (test_kv_trim.py).
    tinymodel.write_tiny_model(share / "kv.gguf", n_layer=2, n_embd=256, n_ff=256,
                               n_ctx_train=32768)
    # Wide enough that compute, not Python, fills a token: threads matter (test_threads.py).
    tinymodel.write_tiny_model(share / "wide.gguf", n_layer=2, n_embd=256, n_ff=512)
    guest_pytest.run(GUEST_COMMAND)
