"""One sequence's KV cache in a llama_cpp.Llama: save, restore, trim, clear.

Only sequence 0 is used. `save` takes llama_state_seq_get_data, which copies the KV of the
sequence alone; Llama.save_state() would also copy the logits (512 MB for a 262k vocabulary).
After each change, llm.input_ids[:n_tokens] names the tokens the KV holds, so the next
Llama.generate() call finds them as a cached prefix and evaluates only what follows.
"""

from __future__ import annotations

import ctypes
from typing import Any

SEQ = 0


def _lib() -> Any:
    import llama_cpp

    return llama_cpp


def _mem(llm: Any) -> Any:
    return _lib().llama_get_memory(llm.ctx)


def _holds(llm: Any, tokens: list[int]) -> None:
    llm.input_ids[: len(tokens)] = tokens
    llm.n_tokens = len(tokens)


def save(llm: Any, limit: int) -> bytes | None:
    """The sequence's KV state, or None if empty or larger than limit bytes."""
    lib = _lib()
    size = lib.llama_state_seq_get_size(llm.ctx, SEQ)
    if size == 0 or size > limit:
        return None
    buf = (ctypes.c_uint8 * size)()
    n = lib.llama_state_seq_get_data(llm.ctx, buf, size, SEQ)
    return bytes(memoryview(buf)[:n]) if n else None


def restore(llm: Any, state: bytes, tokens: list[int]) -> bool:
    """Load a saved state holding `tokens`; False (and an empty cache) if it does not fit."""
    lib = _lib()
    clear(llm)
    buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    if lib.llama_state_seq_set_data(llm.ctx, buf, len(state), SEQ) == 0:
        clear(llm)
        return False
    _holds(llm, tokens)
    return True


def trim(llm: Any, tokens: list[int], keep: int, drop: int) -> list[int] | None:
    """Drop `drop` cached tokens after the first `keep` and shift the rest down (context
    shift). `tokens` are those the cache holds; returns the ones it holds after, or None
    if the model's memory cannot shift positions."""
    lib = _lib()
    mem = _mem(llm)
    if not lib.llama_memory_can_shift(mem):
        return None
    n = len(tokens)
    if not lib.llama_memory_seq_rm(mem, SEQ, keep, keep + drop):
        return None
    lib.llama_memory_seq_add(mem, SEQ, keep + drop, n, -drop)
    kept = tokens[:keep] + tokens[keep + drop:]
    _holds(llm, kept)
    return kept


def clear(llm: Any) -> int:
    """Empty the cache; returns how many tokens it held."""
    held = llm.n_tokens
    _lib().llama_memory_clear(_mem(llm), True)
    llm.reset()
    return held
