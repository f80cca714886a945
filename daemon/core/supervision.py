"""How the daemon keeps workers serving: the wait before a restart, what a worker's death
does to the request it ran, and what status says about a model that will not load.

Decisions only; workers.py does the process work and asks these.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from .requests import Request

FIRST_WAIT = 0.5  # seconds before the first restart after a failure
STABLE_AFTER = 30.0  # a worker up this long after loading has not failed "in a row"
MAX_REQUEUES = 2  # a request that lost this many workers before a token fails at the next
PING_EVERY = 5.0  # seconds between pings at most (a quarter of the liveness deadline below)

Clock = Callable[[], float]


class Backoff:
    """The wait before a worker's next start: FIRST_WAIT doubling with each failure in a
    row, at most `most`. A life that completed a request, or stayed up STABLE_AFTER
    seconds after loading, ends the row: the next failure waits FIRST_WAIT again, however
    many crashes came before (issue 12: the waits used to grow across unrelated crashes).
    """

    def __init__(self, most: float, clock: Clock = time.monotonic) -> None:
        self.most = most
        self.clock = clock
        self.failures = 0  # failures in a row: crashes, hangs and failed loads
        self.retry_at: float | None = None  # when the next start is due, while waiting
        self._up_since: float | None = None

    def up(self) -> None:
        """The worker loaded its model."""
        self._up_since = self.clock()

    def failed(self, served: bool) -> float:
        """A life ended that was not asked to (served: it completed a request); returns
        the seconds to wait before the next start."""
        now = self.clock()
        stable = self._up_since is not None and now - self._up_since >= STABLE_AFTER
        if served or stable:
            self.failures = 0
        self._up_since = None
        self.failures += 1
        # The exponent stays small: a model that never loads fails thousands of times.
        delay = min(self.most, FIRST_WAIT * 2.0 ** min(self.failures - 1, 32))
        self.retry_at = now + delay
        return delay

    def retry_in(self) -> float | None:
        """Seconds until the next start while waiting for it, else None."""
        return None if self.retry_at is None else max(0.0, self.retry_at - self.clock())


def ping_period(liveness_timeout: float) -> float:
    """How often the daemon pings a worker: four pings fit in its deadline."""
    return min(liveness_timeout / 4, PING_EVERY)


def after_loss(req: Request, code: str, message: str) -> tuple[str, str] | None:
    """What the death or hang (code worker_died or worker_hung) of its worker does to req:
    None queues it again in its old place, for it has produced no token and nothing is
    lost (a worker that died just after it was handed the request, issue 12); otherwise
    the (code, message) it fails with. A request whose workers keep dying before its first
    token (a prompt that crashes or hangs them) fails after MAX_REQUEUES tries again."""
    if req.tokens_sent:
        return code, message
    req.lost_workers += 1
    if req.lost_workers <= MAX_REQUEUES:
        return None
    return code, (f"{message}; {req.lost_workers} workers died under this request before "
                  "its first token, so it is not queued again")


class Supervised(Protocol):
    """A worker, as far as a model's status needs it."""

    state: str
    load_error: str
    load_failures: int
    backoff: Backoff


def model_state(workers: Sequence[Supervised]) -> str:
    """ready (a worker is up), unavailable (every worker failed to load) or loading."""
    if any(w.state in ("idle", "busy") for w in workers):
        return "ready"
    if all(w.load_error for w in workers):
        return "unavailable"
    return "loading"


def load_trouble(model: str, workers: Sequence[Supervised]) -> str:
    """Why the model's workers fail to load, how often, and when they try next; "" while
    none fails."""
    failing = [w for w in workers if w.load_error]
    if not failing:
        return ""
    times = max(w.load_failures for w in failing)
    waits = [t for w in failing if (t := w.backoff.retry_in()) is not None]
    when = f"next try in {min(waits):.1f} s" if waits else "trying again now"
    reasons = "; ".join(sorted({w.load_error for w in failing}))
    plural = "s" if times != 1 else ""
    return f"model {model!r} failed to load {times} time{plural} in a row; {when}: {reasons}"
