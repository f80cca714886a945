"""llama.cpp's log in a worker: which lines reach its stderr, and the errors of one call.

llama-cpp-python 0.3.36 maps ggml's log levels as they were before ggml added DEBUG: it
takes 3 for ERROR and 4 for DEBUG, where ggml.h now has 3 WARN and 4 ERROR. With its
logger at ERROR a worker printed llama.cpp's warnings and hid its errors. Here warnings
and errors (and the lines that continue them) go to stderr, where the daemon keeps the
last lines of a worker that dies; and a call that fails can name llama.cpp's reason,
which llama.cpp only logs (a model or an adapter that does not load).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator
from typing import Any

# ggml.h: enum ggml_log_level
DEBUG, INFO, WARN, ERROR, CONT = 1, 2, 3, 4, 5

_state: dict[str, Any] = {"callback": None, "last": INFO, "catching": []}


def _log(level: int, text: bytes, user_data: Any) -> None:
    level = _state["last"] if level == CONT else level
    _state["last"] = level
    if level < WARN:
        return
    line = text.decode("utf-8", "replace")
    if level == ERROR:
        for errors in _state["catching"]:
            errors.append(line)
    # During a load llama-cpp-python points fd 2 at /dev/null (verbose=False); a caught
    # error still names the reason through the call's own message.
    sys.stderr.write(line)
    sys.stderr.flush()


def install(lib: Any) -> None:
    """Make this process's llama.cpp log go through _log (once; kept referenced)."""
    if _state["callback"] is None:
        _state["callback"] = lib.llama_log_callback(_log)
    lib.llama_log_set(_state["callback"], ctypes.c_void_p(0))


@contextlib.contextmanager
def errors() -> Iterator[list[str]]:
    """The ERROR lines llama.cpp logs while the block runs (install() must have run)."""
    caught: list[str] = []
    _state["catching"].append(caught)
    try:
        yield caught
    finally:
        # By identity: lists that caught the same lines are equal.
        _state["catching"] = [c for c in _state["catching"] if c is not caught]


def reason(caught: list[str], limit: int = 600) -> str:
    """The caught lines as one reason, in order, without repeats."""
    lines = dict.fromkeys(x.strip() for x in "".join(caught).splitlines() if x.strip())
    return "; ".join(lines)[:limit]
