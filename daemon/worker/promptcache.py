"""The prompt cache of one worker: KV states of sequences that left their slot, in host
memory, found again by the longest common token prefix. Pure: the states are opaque
bytes, and the disk (cachedisk.py) is reached through the `Spill` it is given.

A sequence's state goes in when its slot is about to be overwritten by a request that
would lose it (llama-server keeps its evicted slots' prompts the same way, behind
--cache-ram). A request takes the entry sharing its longest prefix: the state is copied
into the slot and only the rest is evaluated, so one entry (a common system prompt)
serves many requests. An entry that is a prefix of another is dropped: the longer one
serves it too, cut at the common length.

Memory holds at most `limit` bytes of states, least recently used out first. With a
spill, every entry is written to disk as it comes in, and an entry pushed out of memory
stays findable there; the disk has its own bound.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

MIN_REUSE = 8  # a shorter common prefix (a BOS, a template's first tokens) is not worth a restore


@dataclass(eq=False)
class Entry:
    """The KV state of tokens[:len(tokens)] computed under `adapter`."""

    key: bytes  # the tokens as int32, compared with memcmp
    adapter: Hashable
    size: int  # bytes of the state
    state: bytes | None = None  # None: on disk only
    on_disk: bool = False
    used: int = 0  # the tick of the last lookup or insertion that took it

    @property
    def n_tokens(self) -> int:
        return len(self.key) // 4

    def tokens(self) -> list[int]:
        return array.array("i", self.key).tolist()


class Spill(Protocol):
    """Where entries go beyond memory (cachedisk.Disk)."""

    def write(self, entry: Entry) -> list[Entry]: ...  # returns entries pushed off the disk
    def read(self, entry: Entry) -> bytes | None: ...
    def forget(self, entry: Entry) -> None: ...


@dataclass
class Counters:
    hits: int = 0  # requests that took a cached state (memory or disk)
    disk_hits: int = 0
    misses: int = 0  # requests that found no entry worth restoring
    tokens_reused: int = 0  # prompt tokens not evaluated thanks to a restore
    restore_s: float = 0.0  # time spent restoring, summed
    saved: int = 0  # states put in
    evicted: int = 0  # states pushed out of memory
    dropped: int = 0  # entries gone entirely (memory and disk)


def key_of(tokens: list[int]) -> bytes:
    return array.array("i", tokens).tobytes()


def common_prefix(a: bytes, b: bytes) -> int:
    """Tokens two keys share from the start: a binary search of memcmp'd slices."""
    lo, hi = 0, min(len(a), len(b)) // 4
    if a[: hi * 4] == b[: hi * 4]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[: mid * 4] == b[: mid * 4]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class PromptCache:
    limit: int  # bytes of states held in memory
    spill: Spill | None = None
    entries: list[Entry] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    _tick: itertools.count = field(default_factory=itertools.count)

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.entries if e.state is not None)

    @property
    def in_memory(self) -> int:
        return sum(e.state is not None for e in self.entries)

    def best(self, tokens: list[int], adapter: Hashable) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with tokens (under the same adapter) and
        that length; (None, 0) below MIN_REUSE. Memory wins a tie with the disk."""
        key = key_of(tokens)
        found, n = None, 0
        for e in self.entries:
            if e.adapter != adapter:
                continue
            c = common_prefix(e.key, key)
            if c > n or (c == n and found is not None and found.state is None
                         and e.state is not None):
                found, n = e, c
        return (found, n) if n >= MIN_REUSE else (None, 0)

    def state_of(self, entry: Entry) -> bytes | None:
        """The entry's state, read from the disk if memory let it go; None if it is gone
        (the entry is dropped then)."""
        entry.used = next(self._tick)
        if entry.state is not None:
            return entry.state
        state = self.spill.read(entry) if self.spill is not None else None
        if state is None:
            self._drop(entry)
            return None
        entry.state = state  # back in memory: the next restore of it reads no file
        self.fit()
        return state

    def covers(self, tokens: list[int], adapter: Hashable) -> bool:
        """Whether an entry holds tokens already (they are a prefix of it)."""
        key = key_of(tokens)
        return any(e.adapter == adapter and e.key.startswith(key) for e in self.entries)

    def put(self, tokens: list[int], adapter: Hashable, state: bytes) -> None:
        """Keep a sequence's state; entries it extends go (it serves them too)."""
        key = key_of(tokens)
        if self.covers(tokens, adapter) or len(state) > self.limit:
            return
        for e in [e for e in self.entries if e.adapter == adapter and key.startswith(e.key)]:
            self._drop(e)
        entry = Entry(key, adapter, len(state), state, used=next(self._tick))
        self.entries.append(entry)
        self.counters.saved += 1
        if self.spill is not None:
            for gone in self.spill.write(entry):
                self.forget_disk(gone)
        self.fit()

    def add_from_disk(self, entry: Entry) -> None:
        """An entry found on disk at start (its state stays there until asked for)."""
        entry.used = next(self._tick)
        self.entries.append(entry)

    def fit(self, limit: int | None = None) -> tuple[int, int]:
        """Push the least recently used states out of memory until they fit `limit`
        (the cache's own by default; a new limit is kept). Returns (states, bytes) pushed
        out; with a spill they stay on disk."""
        if limit is not None:
            self.limit = limit
        held = self.bytes
        n = freed = 0
        for e in sorted((e for e in self.entries if e.state is not None), key=lambda e: e.used):
            if held <= self.limit:
                break
            held -= e.size
            freed += e.size
            n += 1
            e.state = None
            self.counters.evicted += 1
            if not e.on_disk:
                self._drop(e)
        return n, freed

    def forget_disk(self, entry: Entry) -> None:
        """The disk let the entry go (its bound, or a failure): drop it unless in memory."""
        entry.on_disk = False
        if entry.state is None:
            self._drop(entry, disk=False)

    def _drop(self, entry: Entry, disk: bool = True) -> None:
        if entry in self.entries:
            self.entries.remove(entry)
            self.counters.dropped += 1
        if disk and entry.on_disk and self.spill is not None:
            self.spill.forget(entry)
        entry.state = None
