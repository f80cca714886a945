"""Will a model fit? What loading it takes (Need, from its GGUF header and settings) and
what may still be loaded (Room, from /proc/meminfo, the slice's cgroup and the budget).
Pure reads and arithmetic: the lifecycle decides what to do with the answer."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..catalog import ggufmeta
from ..catalog.config import ModelConfig, cache_bytes
from ..wire.kvtypes import KV_TYPES, KvType, misfit

MiB = 1 << 20

# llama.cpp rounds the context to 256 cells, then each sequence's stream to 256 cells
# (llama-context.cpp: GGML_PAD(n_ctx, 256), n_ctx_seq = GGML_PAD(n_ctx / n_seq_max, 256)).
KV_PAD = 256
# A worker process before any model: Python, llama-cpp-python, msgspec and the daemon's
# modules (53 MiB measured on x86-64), and llama.cpp's thread pool.
WORKER_BASE = 64 * MiB
# The vocabulary's tables in llama.cpp (token text, scores, piece cache) and the worker's
# piece map: 18 MiB for SmolLM2's 49152 tokens, 43 MiB for Gemma 3's 262144 (RSS after
# load minus the mapped weights); 256 bytes a token covers both, and the logits rows.
VOCAB_TOKEN = 256
# Activations of one ubatch that a step really touches: the compute buffer llama.cpp
# reserves is mostly the logits of a full ubatch (n_batch x n_vocab floats: 514 MiB for
# Gemma 3 at n_batch 512), but the worker asks logits of one token per sequence, and a
# 512-token prompt touched 16 MiB (SmolLM2, n_embd 576) and 23 MiB (Gemma 3, 640) of it.
# 64 bytes per token and embedding channel covers both.
ACTIVATION = 64

# When the header lacks what the KV size needs: a 7-8B-class GQA model's cell (32
# layers x 1024 K and 1024 V channels: 128 KiB in f16), too much for a small model and
# about right for the big ones that would hurt most if underestimated.
GUESS_LAYERS, GUESS_KV_CHANNELS = 32, 1024
GUESS_VOCAB = 128 * 1024
GUESS_EMBD = 4096
# prompt_cache = auto: a quarter of what stays free once the model is loaded, at most
# this much (llama-server's --cache-ram is a fixed 8 GiB, more than many machines have).
AUTO_CACHE_SHARE = 4
AUTO_CACHE_MAX = 2 << 30


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n // scale} {unit}"
    return f"{n >> 10} KiB"


@dataclass(frozen=True)
class Need:
    """What loading one model (all its workers) will take."""
    bytes: int  # total, used for the decision
    weights: int  # file size: mapped, in the page cache once for all workers
    kv: int  # KV cache of all workers: cells x kv_cell_bytes (K and V in their cache types)
    overhead: int  # all workers' process, vocabulary and activations (see the constants)
    measured: bool  # bytes is an earlier load's measured RSS (larger than the estimate)
    guessed: str = ""  # what the header lacked and was guessed; empty: nothing
    cache: int = 0  # a configured prompt cache of all workers (auto is sized after the load)

    def describe(self) -> str:
        parts = (f"weights {_size(self.weights)}, KV {_size(self.kv)}, "
                 f"overhead {_size(self.overhead)}")
        if self.cache:
            parts += f", prompt cache {_size(self.cache)}"
        if self.guessed:
            parts += f"; guessed: {self.guessed}"
        if self.measured:
            estimate = self.weights + self.kv + self.overhead + self.cache
            return (f"{_size(self.bytes)} (measured in an earlier load; estimate "
                    f"{_size(estimate)}: {parts})")
        return f"{_size(self.bytes)} ({parts})"


def _pad(n: int) -> int:
    return -(-n // KV_PAD) * KV_PAD


def kv_cells(model: ModelConfig) -> int:
    """KV cells of one worker's context: parallel streams of n_ctx tokens, as llama.cpp
    pads them. Sliding-window layers count in full: llama.cpp's default (swa_full) gives
    them full-size caches, which the worker keeps."""
    total = _pad(model.n_ctx * model.parallel)
    return _pad(total // model.parallel) * model.parallel


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def cache_types(model: ModelConfig) -> tuple[KvType, KvType]:
    """The model's K and V cache types."""
    return KV_TYPES[model.cache_type_k], KV_TYPES[model.cache_type_v]


def _kv_cell(meta: ggufmeta.Metadata, type_k: KvType, type_v: KvType) -> int | None:
    """Bytes of one KV cell over all layers, from the header, with K and V in their
    cache types (a layer's row is its KV heads x the head size, as llama.cpp sizes it);
    None if the header lacks a count."""
    layers = _int(meta.get("{arch}.block_count"))
    embd = _int(meta.get("{arch}.embedding_length"))
    heads = _int(meta.get("{arch}.attention.head_count"))
    if not (layers and embd and heads):
        return None
    kv_heads = meta.get("{arch}.attention.head_count_kv")
    if isinstance(kv_heads, list):  # per layer (OpenELM and others)
        per_layer = [h for h in kv_heads[:layers] if isinstance(h, int)]
    else:  # llama.cpp: absent means as many as the query heads (no GQA)
        per_layer = [_int(kv_heads) or heads] * layers
    key = _int(meta.get("{arch}.attention.key_length")) or embd // heads
    value = _int(meta.get("{arch}.attention.value_length")) or embd // heads
    return sum(type_k.row_bytes(h * key) + type_v.row_bytes(h * value) for h in per_layer)


def kv_cell_bytes(path: Path, model: ModelConfig) -> int | None:
    """Bytes of one KV cell of the model over all its layers, K and V in its cache types,
    from the header (read once per file); None if the header lacks a count."""
    return _kv_cell(ggufmeta.read(path), *cache_types(model))


def cache_misfit(path: Path, model: ModelConfig) -> tuple[str, str] | None:
    """The cache type setting (cache_type_k or cache_type_v) whose blocks do not divide
    the model's head size, and why, from the header (--check-config; the worker checks
    the same when it loads); None when they fit or the header does not say."""
    meta = ggufmeta.read(path)
    embd = _int(meta.get("{arch}.embedding_length"))
    heads = _int(meta.get("{arch}.attention.head_count"))
    for which, setting, kv in zip("KV", ("cache_type_k", "cache_type_v"), cache_types(model),
                                  strict=True):
        name = "key_length" if which == "K" else "value_length"
        full = _int(meta.get(f"{{arch}}.attention.{name}")) or (
            embd // heads if embd and heads else None)
        swa = _int(meta.get(f"{{arch}}.attention.{name}_swa")) or full
        why = misfit(which, kv, {n for n in (full, swa) if n})
        if why:
            return setting, why
    return None


def estimate(path: Path, model: ModelConfig, measured_rss: int | None = None) -> Need:
    """What loading model (its workers) from path takes. The weights count once: the
    workers map the same file, whose pages the page cache (and the slice) holds once.
    measured_rss (an earlier load of the same file and settings, summed over its
    workers) wins when larger. Never raises: what the header lacks is guessed (and said)."""
    try:
        weights = path.stat().st_size
    except OSError:
        weights = 0
    meta = ggufmeta.read(path)
    guessed = []
    type_k, type_v = cache_types(model)
    cell = _kv_cell(meta, type_k, type_v)
    if cell is None:
        cell = GUESS_LAYERS * (type_k.row_bytes(GUESS_KV_CHANNELS)
                               + type_v.row_bytes(GUESS_KV_CHANNELS))
        guessed.append("KV size")
    vocab = _int(meta.get("{arch}.vocab_size")) or meta.lengths.get("tokenizer.ggml.tokens")
    if not vocab:
        vocab = GUESS_VOCAB
        guessed.append("vocabulary")
    embd = _int(meta.get("{arch}.embedding_length")) or GUESS_EMBD
    kv = cell * kv_cells(model) * model.workers
    # Each worker loads the model's LoRA adapters into its own memory (llama.cpp copies
    # their tensors: about the file's size each, 9.3 MiB for a rank-8 one on SmolLM2).
    adapters = sum(_size_of(Path(p)) for p in model.adapters.values())
    overhead = (WORKER_BASE + vocab * VOCAB_TOKEN + model.n_batch * embd * ACTIVATION
                + adapters) * model.workers
    cache = (cache_bytes(model.prompt_cache, "prompt_cache") or 0) * model.workers
    total = weights + kv + overhead + cache
    measured = measured_rss is not None and measured_rss > total
    return Need(bytes=measured_rss if measured else total, weights=weights, kv=kv,
                overhead=overhead, measured=measured, guessed=", ".join(guessed), cache=cache)


def prompt_cache(model: ModelConfig, left: int) -> int:
    """Bytes of prompt cache for each worker: the configured size, or for auto a share
    of `left` (what stays free once the model is loaded)."""
    size = cache_bytes(model.prompt_cache, "prompt_cache")
    if size is None:
        size = min(AUTO_CACHE_MAX, max(0, left) // AUTO_CACHE_SHARE) // model.workers
    return size


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@dataclass(frozen=True)
class Room:
    """What may still be loaded, and the bound that says so."""
    bytes: int
    limit: str  # "MemAvailable", "llm.slice memory.max", "llm.slice memory.high",
    # "daemon.memory_budget", or "none" when nothing could be read

    def describe(self) -> str:
        if self.limit == "none":
            return "unknown (no bound could be read)"
        return f"{_size(self.bytes)} ({self.limit})"


def _mem_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_limit(path: Path) -> int | None:
    """memory.max / memory.high: None when unset ("max") or unreadable."""
    try:
        text = path.read_text().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def room(loaded: int, freeable: int, slice_cgroup: Path | None, budget: int | None,
         meminfo: Path = Path("/proc/meminfo")) -> Room:
    """What may still be loaded once the freeable models are gone. loaded: bytes charged
    by the models loaded now; freeable: those of the models that may be evicted (part of
    loaded). A limit counts what stays loaded against it, not memory.current: that holds
    page cache the kernel can drop (ollama issue 15474). MemAvailable already leaves out
    what the loaded models use, so the freeable part is added back. The tightest wins;
    a negative room is 0."""
    staying = max(0, loaded - freeable)
    bounds: list[tuple[int, str]] = []
    available = _mem_available(meminfo)
    if available is not None:
        bounds.append((available + freeable, "MemAvailable"))
    if slice_cgroup is not None:
        for key in ("memory.max", "memory.high"):
            limit = _cgroup_limit(slice_cgroup / key)
            if limit is not None:
                bounds.append((limit - staying, f"{slice_cgroup.name} {key}"))
    if budget is not None:
        bounds.append((budget - staying, "daemon.memory_budget"))
    if not bounds:
        return Room(bytes=sys.maxsize, limit="none")
    free, limit = min(bounds, key=lambda b: b[0])
    return Room(bytes=max(0, free), limit=limit)
