"""The types llama.cpp can keep a KV cache in, as the config names them and the worker
passes them to llama_context_params (type_k, type_v).

The list is llama-server's (`--cache-type-k/-v`: common/arg.cpp `kv_cache_types`, in its
order). ggml's id, block and size of each are from ggml.h (enum ggml_type) and
ggml_blck_size / ggml_type_size: llama-cpp-python 0.3.36 does not export GGML_TYPE_BF16,
and its other GGML_TYPE_* constants match these ids (tests/unit/test_kvtypes.py checks
them against libggml). A quantized type packs `block` elements into `size` bytes; each
K and V row of the cache is a head's elements times the KV heads, so the block must
divide the head size.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KvType:
    name: str  # ggml_type_name, as llama-server's --cache-type-k takes it
    ggml: int  # enum ggml_type
    block: int  # elements per block (ggml_blck_size); 1 for the float types
    size: int  # bytes per block (ggml_type_size)

    @property
    def quantized(self) -> bool:
        """ggml_is_quantized: the float types (f32, f16, bf16) are not."""
        return self.block > 1

    def row_bytes(self, elements: int) -> int:
        """Bytes of a row of this many elements (ggml_row_size)."""
        return self.size * elements // self.block


KV_TYPES: dict[str, KvType] = {t.name: t for t in (
    KvType("f32", 0, 1, 4),
    KvType("f16", 1, 1, 2),
    KvType("bf16", 30, 1, 2),
    KvType("q8_0", 8, 32, 34),
    KvType("q4_0", 2, 32, 18),
    KvType("q4_1", 3, 32, 20),
    KvType("iq4_nl", 20, 32, 18),
    KvType("q5_0", 6, 32, 22),
    KvType("q5_1", 7, 32, 24),
)}
DEFAULT = "f16"  # llama.cpp's default cache type


def misfit(which: str, kv: KvType, sizes: set[int]) -> str:
    """Why a cache of type kv cannot hold heads of these sizes (which: "K" or "V"); "" if
    it can."""
    bad = sorted(n for n in sizes if n % kv.block)
    if not bad:
        return ""
    floats = ", ".join(t.name for t in KV_TYPES.values() if not t.quantized)
    return (f"{kv.name} packs a {which} head into blocks of {kv.block} elements, and this "
            f"model's {which} heads have {bad[0]}: choose a type that fits ({floats} fit "
            "any head size)")
