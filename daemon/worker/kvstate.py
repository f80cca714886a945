"""One sequence's KV cache in a llama context: save, restore, trim, drop.

`save` takes llama_state_seq_get_data, which copies the KV of that sequence alone; a
whole-context save would also copy the logits (512 MB for a 262k vocabulary). `ctx` is
the raw llama_context pointer; `seq` the sequence id (the worker's slot).
"""

from __future__ import annotations

import ctypes
from typing import Any


def _lib() -> Any:
    import llama_cpp

    return llama_cpp


def _mem(ctx: Any) -> Any:
    return _lib().llama_get_memory(ctx)


def save(ctx: Any, seq: int, limit: int) -> bytes | None:
    """The sequence's KV state, or None if empty or larger than limit bytes."""
    lib = _lib()
    size = lib.llama_state_seq_get_size(ctx, seq)
    if size == 0 or size > limit:
        return None
    buf = (ctypes.c_uint8 * size)()
    n = lib.llama_state_seq_get_data(ctx, buf, size, seq)
    return bytes(memoryview(buf)[:n]) if n else None


def restore(ctx: Any, seq: int, state: bytes) -> bool:
    """Load a saved state into sequence seq; False (and an empty sequence) if it does
    not fit."""
    lib = _lib()
    drop(ctx, seq)
    buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    if lib.llama_state_seq_set_data(ctx, buf, len(state), seq) == 0:
        drop(ctx, seq)
        return False
    return True


def trim(ctx: Any, seq: int, held: int, keep: int, drop_n: int) -> bool:
    """Drop `drop_n` cached positions after the first `keep` of a sequence holding `held`
    and shift the rest down (context shift); False if the memory cannot shift."""
    lib = _lib()
    mem = _mem(ctx)
    if not lib.llama_memory_can_shift(mem) or not lib.llama_memory_seq_rm(
            mem, seq, keep, keep + drop_n):
        return False
    lib.llama_memory_seq_add(mem, seq, keep + drop_n, held, -drop_n)
    return True


def drop(ctx: Any, seq: int, start: int = 0) -> None:
    """Forget the sequence's cache from position start on."""
    _lib().llama_memory_seq_rm(_mem(ctx), seq, start, -1)

