"""The KV cache types a Load asks for, as ggml type ids for llama_context_params, checked
against the model's head sizes first.

A quantized type packs 32 elements into a block, and a cache row holds whole heads, so
the block must divide the head size. llama.cpp checks that only with flash attention
(llama_init_from_model); without it, it opened a q8_0 K cache for 16-element heads,
whose rows ggml sizes as half a block, and decoded with it without an error. Here the
load fails either way, naming the setting.
"""

from __future__ import annotations

import ctypes
from typing import Any

from ..wire.kvtypes import KV_TYPES, misfit
from .refusals import Unfit

SETTINGS = {"K": "cache_type_k", "V": "cache_type_v"}


def ggml_types(lib: Any, model: Any, type_k: str, type_v: str) -> tuple[int, int]:
    """The ggml ids of the K and V cache types; Unfit names the setting that does not fit
    this model (lib: llama_cpp, model: its llama_model pointer)."""
    ids = []
    for which, name in (("K", type_k), ("V", type_v)):
        kv = KV_TYPES.get(name)
        if kv is None:
            raise Unfit(SETTINGS[which], f"no KV cache type {name!r} (one of "
                        f"{', '.join(KV_TYPES)})")
        why = misfit(which, kv, head_sizes(lib, model, which))
        if why:
            raise Unfit(SETTINGS[which], why)
        ids.append(kv.ggml)
    return ids[0], ids[1]


def head_sizes(lib: Any, model: Any, which: str) -> set[int]:
    """The model's K or V head sizes, of its full and its sliding-window attention layers,
    read from the GGUF as llama.cpp reads them (llama-model.cpp load_hparams)."""
    arch = _meta(lib, model, "general.architecture")
    heads = lib.llama_model_n_head(model)
    default = lib.llama_model_n_embd(model) // heads if heads > 0 else 0
    name = "key_length" if which == "K" else "value_length"
    full = _int(_meta(lib, model, f"{arch}.attention.{name}")) or default
    swa = _int(_meta(lib, model, f"{arch}.attention.{name}_swa")) or full
    return {full, swa} - {0}


def setting_of(reason: str) -> str | None:
    """The setting llama.cpp's refusal of a context is about, from its log line (it
    refuses a K or V cache type, e.g. `V cache type q8_0 with block size 32 does not
    divide n_embd_head_v=16`); None for any other reason."""
    for which, setting in SETTINGS.items():
        if f"{which} cache" in reason:
            return setting
    return None


def _meta(lib: Any, model: Any, key: str) -> str:
    buf = ctypes.create_string_buffer(64)
    n = lib.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else ""


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0
