"""Read the metadata (key/value) section of a GGUF file: what the memory estimate needs
(architecture, layer and head counts, vocabulary size) without loading the model and
without a dependency (the gguf package is a test tool here, not a daemon dependency)."""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any


class ModelUnavailable(Exception):
    """The model's file cannot be had; the message says why and how to fix it."""


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what llama.cpp reads; version 1 files were dropped long ago


def check_gguf(path: Path) -> None:
    """ModelUnavailable unless path is a readable GGUF file of a version llama.cpp reads."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise ModelUnavailable(f"{path}: no such file") from None
    except OSError as exc:
        raise ModelUnavailable(f"{path}: {exc.strerror or exc}") from None
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelUnavailable(f"{path}: not a GGUF file (it starts with {head[:4]!r}, "
                               f"not {GGUF_MAGIC!r})")
    version = int.from_bytes(head[4:], "little")
    if version not in GGUF_VERSIONS:
        raise ModelUnavailable(f"{path}: GGUF version {version} is not supported "
                               f"(llama.cpp reads {' and '.join(map(str, GGUF_VERSIONS))})")


# Value types of the GGUF spec (ggml/docs/gguf.md): struct format of the fixed-size ones.
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
          12: "d"}
_STRING, _ARRAY = 8, 9
KEEP_ARRAY = 4096  # numeric arrays up to this length are kept (per-layer head counts)
MAX_KV = 1 << 20  # more entries than this is a corrupt header, not a model


@dataclass(frozen=True)
class Metadata:
    values: dict[str, Any] = field(default_factory=dict)  # scalars, short numeric arrays
    lengths: dict[str, int] = field(default_factory=dict)  # every array's length
    error: str = ""  # why reading stopped early; what was read before it is kept

    @property
    def arch(self) -> str:
        arch = self.values.get("general.architecture")
        return arch if isinstance(arch, str) else ""

    def get(self, key: str) -> Any:
        """'{arch}.block_count' style keys: the value under the file's architecture."""
        return self.values.get(key.replace("{arch}", self.arch))


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf, self.pos = buf, 0

    def fixed(self, code: str) -> Any:
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += struct.calcsize(code)
        return value

    def string(self, keep: bool = True) -> str:
        n = self.fixed("Q")
        if self.pos + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        start, self.pos = self.pos, self.pos + n
        return bytes(self.buf[start:self.pos]).decode("utf-8", "replace") if keep else ""


def _value(r: _Reader, vtype: int, key: str, out: Metadata) -> Any:
    if vtype in _FIXED:
        return r.fixed(_FIXED[vtype])
    if vtype == _STRING:
        return r.string()
    if vtype != _ARRAY:
        raise ValueError(f"{key}: unknown value type {vtype}")
    etype, count = r.fixed("I"), r.fixed("Q")
    out.lengths[key] = count
    if etype in _FIXED:
        size = struct.calcsize(_FIXED[etype])
        if r.pos + count * size > len(r.buf):
            raise ValueError(f"{key}: the array runs past the end of the file")
        if count <= KEEP_ARRAY:
            items = list(struct.unpack_from(f"<{count}{_FIXED[etype]}", r.buf, r.pos))
            r.pos += count * size
            return items
        r.pos += count * size
        return None
    if etype == _STRING:  # the vocabulary: only its length matters here
        for _ in range(count):
            r.string(keep=False)
        return None
    raise ValueError(f"{key}: arrays of type {etype} are not read")


def _read(path: Path) -> Metadata:
    out = Metadata()
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            r = _Reader(buf)
            if bytes(buf[:4]) != b"GGUF":
                return Metadata(error="not a GGUF file")
            r.pos = 4
            version = r.fixed("I")
            if version not in (2, 3):
                return Metadata(error=f"GGUF version {version} is not read")
            r.fixed("Q")  # tensor count
            n_kv = r.fixed("Q")
            if n_kv > MAX_KV:
                return Metadata(error=f"{n_kv} metadata entries: a corrupt header")
            for _ in range(n_kv):
                key = r.string()
                value = _value(r, r.fixed("I"), key, out)
                if value is not None:
                    out.values[key] = value
    except (OSError, ValueError, struct.error) as exc:
        # A short or odd file: keep what was read; the estimate falls back for the rest.
        return Metadata(values=out.values, lengths=out.lengths, error=str(exc) or "truncated")
    return out


@lru_cache(maxsize=32)
def _cached(path: str, size: int, mtime_ns: int) -> Metadata:
    return _read(Path(path))


def read(path: Path) -> Metadata:
    """The file's metadata; never raises: a file that cannot be read gives a Metadata
    whose error says why. Cached by (path, size, mtime): the vocabulary of a large model
    takes tens of milliseconds to skip over."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return Metadata(error=exc.strerror or str(exc))
    return _cached(str(path), st.st_size, st.st_mtime_ns)
