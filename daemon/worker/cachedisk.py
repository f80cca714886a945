"""The prompt cache's files: one per entry under the model's cache directory, written by a
thread of their own as entries come in, read back when a request restores one, and
found again by the next worker (after an unload, a crash, a daemon restart).

A file is trusted only if its identity (the model file, the llama.cpp build, the context
layout: everything the bytes of a KV state depend on) equals this worker's, and only if
its checksum holds; anything else is removed with one warning, and the request it could
have served is recomputed. A write that fails (disk full, a directory the worker may
not write) turns the disk off with an error in the status; serving goes on from memory.

Layout of a file: MAGIC, a 4-byte header length, the header (JSON: identity, adapter,
n_tokens, size, crc32 of tokens and state), the tokens as int32, the state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .promptcache import Entry

MAGIC = b"llm-residentd prompt cache 1\n"
SUFFIX = ".kvc"
HEADER_MAX = 1 << 16


def model_identity(path: str) -> dict[str, Any]:
    """What tells one model file from another: size, mtime and a hash of its first MiB
    (the GGUF header and the first tensors)."""
    st = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": head}


class Disk:
    """Entries on disk, bounded to `limit` bytes (least recently used out first)."""

    def __init__(self, root: Path, limit: int, identity: dict[str, Any],
                 warn: Callable[[str], None]) -> None:
        self.root, self.limit, self.warn = root, limit, warn
        self.identity = json.loads(json.dumps(identity))  # as a header reads it back
        self.tag = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        self.error: str | None = None
        self.files: dict[int, tuple[Entry, Path, int]] = {}  # id(entry) -> entry, file, bytes
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[Entry, Path, bytes] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._n = 0
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._fail(f"cannot create {root}: {exc}")

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(size for _, _, size in self.files.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self.files)

    # -- at start --------------------------------------------------------------

    def load(self) -> list[Entry]:
        """The usable entries already on disk, least recently written first; others are
        removed (one warning says how many and why)."""
        if self.error is not None:
            return []
        found, refused = [], {}
        try:
            for tmp in self.root.glob("*.tmp"):  # a worker that died writing
                _unlink(tmp)
            paths = sorted(self.root.glob(f"*{SUFFIX}"), key=_mtime)
        except OSError as exc:
            self._fail(f"cannot list {self.root}: {exc}")
            return []
        for path in paths:
            try:
                header, key = _read_head(path)
                why = self._refuse(header, key)
            except (OSError, ValueError) as exc:
                why = f"unreadable ({exc})"
            if why:
                refused[why] = refused.get(why, 0) + 1
                _unlink(path)
                continue
            entry = Entry(key, None, header["size"], on_disk=True)
            self.files[id(entry)] = (entry, path, path.stat().st_size)
            found.append(entry)
        if refused:
            self.warn(f"prompt cache: removed {sum(refused.values())} file(s) in {self.root} "
                      f"that this worker cannot use: " + "; ".join(
                          f"{n} {why}" for why, n in refused.items()))
        return found

    def _refuse(self, header: dict[str, Any], key: bytes) -> str:
        if header.get("identity") != self.identity:
            got, want = header.get("identity") or {}, self.identity
            diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            return f"made for another {'/'.join(diff) or 'identity'}"
        if header.get("adapter") is not None or len(key) // 4 != header.get("n_tokens"):
            return "with a header that does not match its tokens"
        return ""

    # -- writing ----------------------------------------------------------------

    def write(self, entry: Entry) -> list[Entry]:
        """Queue the entry's file; returns the entries pushed off the disk for its room.
        Only base-model entries are written (an adapter's file identity is not checked)."""
        if self.error is not None or entry.adapter is not None or entry.state is None:
            return []
        self._n += 1
        path = self.root / f"{self.tag}-{os.getpid()}-{self._n}{SUFFIX}"
        size = len(MAGIC) + 4 + 512 + len(entry.key) + entry.size  # the header, about
        if size > self.limit:
            return []
        with self._lock:
            self.files[id(entry)] = (entry, path, size)
        entry.on_disk = True
        self._queue.put((entry, path, entry.state))
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="prompt-cache-disk",
                                            daemon=True)
            self._writer.start()
        return self._make_room()

    def _make_room(self) -> list[Entry]:
        gone = []
        with self._lock:
            total = sum(size for _, _, size in self.files.values())
            for entry, path, size in sorted(self.files.values(), key=lambda f: f[0].used):
                if total <= self.limit:
                    break
                del self.files[id(entry)]
                total -= size
                _unlink(path)
                gone.append(entry)
        for entry in gone:
            entry.on_disk = False
        return gone

    def _write_loop(self) -> None:
        while (job := self._queue.get()) is not None:
            entry, path, state = job
            try:
                self._write(entry, path, state)
            except OSError as exc:
                with self._lock:
                    self.files.pop(id(entry), None)
                entry.on_disk = False
                _unlink(path.with_suffix(".tmp"))
                self._fail(f"cannot write {path}: {exc}")
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _write(self, entry: Entry, path: Path, state: bytes) -> None:
        with self._lock:
            if id(entry) not in self.files:
                return  # forgotten before its turn
        header = json.dumps({"identity": self.identity, "adapter": None,
                             "n_tokens": entry.n_tokens, "size": len(state),
                             "crc32": zlib.crc32(state, zlib.crc32(entry.key))}).encode()
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(header)) + header)
            f.write(entry.key)
            f.write(state)
        with self._lock:
            if id(entry) in self.files:
                os.replace(tmp, path)
                self.files[id(entry)] = (entry, path, path.stat().st_size)
                return
        _unlink(tmp)

    def flush(self, timeout: float) -> bool:
        """Wait until the queued files are written (a worker about to exit)."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    # -- reading and forgetting ----------------------------------------------------

    def read(self, entry: Entry) -> bytes | None:
        """The entry's state; None (and the file removed, with a warning) if it is gone,
        truncated, or fails its checksum."""
        with self._lock:
            found = self.files.get(id(entry))
        if found is None:
            return None
        path = found[1]
        try:
            with open(path, "rb") as f:
                header, key = _read_head(path, f)
                state = f.read(header["size"] + 1)
            if len(state) != header["size"] or key != entry.key:
                raise ValueError("truncated")
            if zlib.crc32(state, zlib.crc32(key)) != header["crc32"]:
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, KeyError) as exc:
            self.warn(f"prompt cache: removed {path}: {exc}; the prompt is evaluated again")
            self.forget(entry)
            return None
        return state

    def forget(self, entry: Entry) -> None:
        with self._lock:
            found = self.files.pop(id(entry), None)
        if found is not None:
            _unlink(found[1])
        entry.on_disk = False

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
            self.warn(f"prompt cache: the disk cache is off: {why}")


def _read_head(path: Path, f: Any = None) -> tuple[dict[str, Any], bytes]:
    own = f is None
    f = f or open(path, "rb")  # noqa: SIM115 - closed below when opened here
    try:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError("not a prompt cache file")
        (n,) = struct.unpack("<I", f.read(4) or b"\0\0\0\0")
        if not 0 < n <= HEADER_MAX:
            raise ValueError("bad header length")
        header = json.loads(f.read(n))
        key = f.read(4 * int(header["n_tokens"]))
        if len(key) != 4 * header["n_tokens"]:
            raise ValueError("truncated")
        return header, key
    except (json.JSONDecodeError, KeyError, TypeError, struct.error) as exc:
        raise ValueError(f"bad header: {exc}") from None
    finally:
        if own:
            f.close()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
