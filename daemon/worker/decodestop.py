"""Stop a worker's llama_decode call early when the daemon asks for what must not wait.

A thread change, a cancel, or a preemption during prompt evaluation used to wait for the
llama_decode call in progress. Beside busy neighbours, one token still computed with the
threads the change takes away took up to 5.6 s here (bench/threads_reaction.py), and a
prompt chunk takes longer. ggml asks an abort callback once per graph node; here it
is libc's strlen() on a two-byte buffer ("\\0" go on, "\\1" stop), so asking costs
nanoseconds and no Python (a Python callback cost microseconds a node, too many to leave
installed while decoding). A watcher thread waits on the daemon's socket while a request
runs, takes control messages in, and sets the flag when one must not wait. llama.cpp
drops the aborted ubatch's positions from the KV cache (llama_context::decode), so the
call can simply be made again.
"""

from __future__ import annotations

import ctypes
import select
import threading
from collections.abc import Callable
from typing import Any, Protocol

_STRLEN = ctypes.CDLL(None).strlen


class Polled(Protocol):
    """The worker's Channel, as far as the watcher uses it."""

    lock: threading.RLock
    shutdown: bool

    def fileno(self) -> int: ...
    def poll(self) -> None: ...


class DecodeStop:
    def __init__(self, channel: Polled, wanted: Callable[[], bool]) -> None:
        """wanted() says, after control messages came in, whether the running call stops."""
        self.channel, self.wanted = channel, wanted
        self._flag = ctypes.create_string_buffer(2)
        self._callback: Any = None
        self._armed = False
        # The channel's lock: (dis)arming waits for a poll in progress on the watcher.
        self._cond = threading.Condition(channel.lock)
        threading.Thread(target=self._watch, name="decode-stop", daemon=True).start()

    def install(self, lib: Any, ctx: Any) -> None:
        """Make ctx's llama_decode calls ask the flag (again for each new context)."""
        self._callback = ctypes.cast(_STRLEN, lib.ggml_abort_callback)
        lib.llama_set_abort_callback(ctx, self._callback, ctypes.cast(self._flag, ctypes.c_void_p))

    @property
    def fired(self) -> bool:
        return self._flag.raw[0] != 0

    def clear(self) -> None:
        self._flag[0] = b"\0"

    def arm(self) -> None:
        """Watch the socket (while sequences run); the main thread reads it itself
        otherwise, with blocking reads the watcher must not race."""
        if not self._armed:
            with self._cond:
                self._armed = True
                self._cond.notify()

    def disarm(self) -> None:
        if self._armed:
            with self._cond:
                self._armed = False
        self.clear()

    def _watch(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._armed)
            select.select([self.channel], [], [])
            with self._cond:
                if not self._armed:
                    continue  # the request ended; the main thread reads this message
                self.channel.poll()
                if self.wanted():
                    self._flag[0] = b"\1"
                if self.channel.shutdown:
                    self._armed = False  # the socket stays readable at its end
