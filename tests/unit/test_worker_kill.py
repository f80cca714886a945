"""A worker that died just before the daemon kills it keeps its real exit status.

The daemon reads EOF on the worker's socket before asyncio's child watcher thread has
reaped the process. A slow watcher makes that window wide enough to hit every time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable

import psutil
import pytest
from llm_residentd.core.workers import kill


class SlowWatcher(asyncio.ThreadedChildWatcher):
    """Waits 2 s after the spawn before it reaps (asyncio.set_child_watcher: Python < 3.14)."""

    def _do_waitpid(self, *args: object) -> None:
        time.sleep(2)
        super()._do_waitpid(*args)


def _exit_code_after_death(kill_fn: Callable[[asyncio.subprocess.Process], None]) -> int:
    async def main() -> int:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "input()",
                                                    stdin=asyncio.subprocess.PIPE)
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "child never became a zombie"
            await asyncio.sleep(0.01)
        assert proc.returncode is None  # the watcher has not reaped it yet
        kill_fn(proc)
        return await proc.wait()

    asyncio.set_child_watcher(SlowWatcher())
    try:
        return asyncio.run(main())
    finally:
        asyncio.set_child_watcher(None)


@pytest.mark.parametrize(("kill_fn", "code"), [
    (kill, -signal.SIGKILL),
    # Control: Process.kill() reaps the zombie itself, so the watcher reports 255.
    (asyncio.subprocess.Process.kill, 255),
])
def test_kill_leaves_the_exit_status_to_the_child_watcher(kill_fn, code):
    assert _exit_code_after_death(kill_fn) == code
