"""LoRA adapters in the worker: each loaded once beside the base model, applied per step.

llama.cpp holds the adapters of a context (llama_set_adapters_lora), not of a sequence,
so the worker sets them before each llama_decode call, and the batcher puts only
sequences of one adapter setting (a `key`) in a step. Setting the same adapters again
costs nothing; a change makes llama.cpp reserve its compute graph again before the next
decode (bench/adapters.py measures it). An adapter holds only its low-rank matrices: the
base model stays in memory once for every request, with or without one.
"""

from __future__ import annotations

import ctypes
from collections.abc import Hashable
from typing import Any

from . import llamalog
from .refusals import Refused

Key = Hashable  # None: the base model alone; else (name, scale)


class Adapters:
    """The adapters of one worker: those llama.cpp loaded, and why the others failed."""

    def __init__(self, lib: Any, model: Any, paths: dict[str, str]) -> None:
        self.lib = lib
        self.loaded: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        for name, path in paths.items():
            adapter, error = _load(lib, model, path)
            if adapter is None:
                self.errors[name] = error
            else:
                self.loaded[name] = adapter
        self.current: Key = None  # what the context applies now

    def status(self) -> dict[str, str]:
        """name -> "" if loaded, else the reason (for the Ready message)."""
        return {**dict.fromkeys(self.loaded, ""), **self.errors}

    def key(self, name: str, scale: float) -> Key:
        """The batching key of a request's adapter; Refused (bad_request) if it cannot
        run here. Scale 0 is the base model: llama.cpp drops such an adapter."""
        if not name:
            return None
        if name in self.errors:
            raise Refused("adapter", f"adapter {name!r} failed to load: {self.errors[name]}")
        if name not in self.loaded:
            known = ", ".join(sorted(self.status())) or "none"
            raise Refused("adapter", f"no adapter {name!r} in this worker (it has: {known})")
        return None if scale == 0 else (name, float(scale))

    def apply(self, ctx: Any, key: Key) -> bool:
        """Make the context apply key's adapter (or none) from the next decode on; True if
        that changed anything."""
        if key == self.current:
            return False
        if key is None:
            self.lib.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            name, scale = key
            adapters = (self.lib.llama_adapter_lora_p_ctypes * 1)(self.loaded[name])
            scales = (ctypes.c_float * 1)(scale)
            self.lib.llama_set_adapters_lora(ctx, adapters, 1, scales)
        self.current = key
        return True

    def forget_context(self) -> None:
        """A new context applies no adapter yet."""
        self.current = None


def _load(lib: Any, model: Any, path: str) -> tuple[Any, str]:
    """llama_adapter_lora_init, with the reason of a failure: llama.cpp only logs it (a
    tensor whose shape does not match the base model, another architecture, not a LoRA)."""
    with llamalog.errors() as caught:
        adapter = lib.llama_adapter_lora_init(model, path.encode())
    if adapter:
        return adapter, ""
    why = next((e.split("failed to apply lora adapter: ", 1)[1].strip() for e in caught
                if "failed to apply lora adapter: " in e), llamalog.reason(caught))
    return None, why or "llama_adapter_lora_init failed"
