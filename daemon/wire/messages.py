"""Every message between the daemon and a worker, declared once and used by both ends.

Frames are those of protocol.py (a 4-byte length, then msgpack); each holds one map
whose "type" names the message. msgspec checks a received message against its
declaration (field names, types, required fields) while decoding, so neither end
hand-checks dict keys. docs/protocol.md's worker section is generated from this file.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .protocol import HEADER

IPC_MAX_FRAME = 64 << 20  # a saved KV state travels in a frame


class _Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    pass


# -- daemon -> worker ----------------------------------------------------------------


class Load(_Msg, tag="load"):
    """The first message: which model to open and how."""

    path: str
    n_ctx: int  # tokens per sequence
    n_batch: int  # most prompt tokens in one llama_decode call
    threads: int  # 0: the CPUs the worker may use
    chat_template: bool
    seed: int
    stream_interval: float
    flash_attn: bool = False
    cache_type_k: str = "f16"  # the K cache's type by name (kvtypes.py: f16, q8_0, ...)
    cache_type_v: str = "f16"  # the V cache's type, likewise
    parallel: int = 1  # sequences decoded together (slots)
    adapters: dict[str, str] = {}  # LoRA adapter name -> GGUF path, loaded once
    prompt_cache: int = 0  # bytes of KV states kept in memory for later prompts; 0: none
    prompt_cache_disk: int = 0  # bytes of them kept on disk; 0: none
    prompt_cache_dir: str = ""  # where, for this model


class Resume(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where a preempted request stopped, so that a worker can continue it."""

    context: list[int]  # prompt and generated tokens
    prompt_tokens: int
    generated: int
    output: list[int]  # generated tokens, never trimmed
    state: bytes | None = None  # the sequence's saved KV, or None: recompute
    pending: bytes = b""  # bytes of a character not complete yet
    held: str = ""  # text held back as a possible start of a stop string


class RequestParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a request generates from and how: the submit op's fields that reach the worker.
    The defaults here are the request's defaults (the submit op and llmctl show them)."""

    max_tokens: int
    prompt: str = ""
    messages: list[dict[str, Any]] | None = None
    raw: bool = False
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = -1
    stop: list[str] = []
    ignore_eos: bool = False
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None
    adapter: str = ""  # a LoRA adapter of Load.adapters, for this request only
    adapter_scale: float = 1.0  # its LoRA scale; 0 is the base model


def defaults(*names: str) -> dict[str, Any]:
    """The declared defaults of these fields of RequestParams."""
    fields = {f.name: f for f in msgspec.structs.fields(RequestParams)}
    return {name: fields[name].default for name in names}


class Generate(_Msg, tag="generate"):
    """Run one request in a free slot (the daemon sends no more than the worker has)."""

    req: str
    params: RequestParams
    resume: Resume | None = None


class Cancel(_Msg, tag="cancel"):
    req: str


class Preempt(_Msg, tag="preempt"):
    """Give up req's slot at the next step; a context of at least state_min_tokens is
    saved with the answer, a shorter one is recomputed where it resumes."""

    req: str
    state_min_tokens: int


class SetThreads(_Msg, tag="set_threads"):
    n: int


class TrimKv(_Msg, tag="trim_kv"):
    """Drop the middle of a sequence's cache: req's, or the longest one's."""

    keep: int = 64
    tail: int = 256
    min_prune: int = 64
    req: str | None = None


class ShrinkKv(_Msg, tag="shrink_kv"):
    """Reopen the context with n_ctx tokens per sequence, keeping the sequences."""

    n_ctx: int
    keep: int = 64
    tail: int = 256


class SetPromptCache(_Msg, tag="set_prompt_cache"):
    """Hold at most `limit` bytes of prompt cache in memory (least recently used out
    first; on disk they stay). Answered with a PromptCache report."""

    limit: int


class Ping(_Msg, tag="ping"):
    pass


class Shutdown(_Msg, tag="shutdown"):
    pass


ToWorker = (Load | Generate | Cancel | Preempt | SetThreads | TrimKv | ShrinkKv
            | SetPromptCache | Ping | Shutdown)


# -- worker -> daemon ----------------------------------------------------------------


class Ready(_Msg, tag="ready"):
    pid: int
    threads: int
    threads_why: str
    n_ctx: int  # tokens per sequence
    slots: int  # sequences it runs at once
    load_s: float
    chat_template: bool
    adapters: dict[str, str] = {}  # name -> "" if loaded, else why it could not be


class LoadFailed(_Msg, tag="load_failed"):
    message: str
    param: str | None = None  # the setting at fault (a key of [models.NAME]), if one is


class Token(_Msg, tag="token"):
    """Text of one or more tokens of req (one frame per stream_interval)."""

    req: str
    text: str
    tokens: int


class Stats(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length
    prefill_s: float
    tokens_per_s: float | None
    cached_tokens: int = 0  # prompt tokens whose KV came from a cache (the slot's or the prompt cache)


class Done(_Msg, tag="done"):
    """req ended: with stats, or cancelled (stats None) in stage prefill or decode."""

    req: str
    stats: Stats | None = None
    cancelled: bool = False
    stage: str = ""
    completion_tokens: int = 0


class Preempted(_Msg, tag="preempted"):
    req: str
    resume: Resume


class Error(_Msg, tag="error"):
    """req failed; the other sequences go on. code: too_long, bad_request or internal."""

    req: str
    code: str
    message: str
    param: str | None = None  # bad_request: the request field it is about


class Threads(_Msg, tag="threads"):
    """A thread count taken: idle, or in a prefill or decode step after `at` tokens;
    redone if the llama_decode call in progress was stopped and made again."""

    n: int
    stage: str
    at: int = 0
    redone: bool = False


class Kv(_Msg, tag="kv"):
    """The answer to trim_kv or shrink_kv (asked), or a context grown back for a
    request that needed room (op grow_kv, not asked)."""

    op: str
    result: str
    tokens_before: int
    tokens_after: int
    n_ctx: int
    rss_before: int
    rss_after: int
    ms: float
    asked: bool = True
    req: str | None = None


class Batch(_Msg, tag="batch"):
    """What the batch did since the last report (sent at most once a second while busy,
    and once when it goes idle)."""

    steps: int  # llama_decode calls
    tokens: int  # tokens in them
    sequences: int  # sequences in them, summed over the steps
    cells: dict[str, int] = {}  # request -> KV cells its sequence holds now


class CacheStats(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A worker's prompt cache: what it holds and what it has done since the worker started."""

    entries: int = 0  # states held in memory
    bytes: int = 0
    limit: int = 0
    disk_entries: int = 0
    disk_bytes: int = 0
    disk_limit: int = 0
    disk_error: str | None = None  # why the disk cache is off, if it broke
    hits: int = 0  # requests that restored a cached state
    disk_hits: int = 0  # of them, from disk
    misses: int = 0  # requests that found nothing to reuse
    tokens_reused: int = 0  # prompt tokens restored instead of evaluated
    restore_s: float = 0.0  # time spent restoring, summed
    saved: int = 0
    evicted: int = 0  # states pushed out of memory (to disk, or gone)


class PromptCache(_Msg, tag="prompt_cache"):
    """The prompt cache's state: sent when it changed (at most once a second while busy),
    and in answer to set_prompt_cache with what that pushed out."""

    stats: CacheStats
    asked: bool = False  # the answer to set_prompt_cache
    freed_entries: int = 0
    freed_bytes: int = 0


class Pong(_Msg, tag="pong"):
    pass


FromWorker = (Ready | LoadFailed | Token | Done | Preempted | Error | Threads | Kv | Batch
              | PromptCache | Pong)

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)
DecodeError = msgspec.DecodeError  # also raised for a message that breaks its declaration


def frame(msg: msgspec.Struct) -> bytes:
    body = _encoder.encode(msg)
    return HEADER.pack(len(body)) + body


def to_worker(body: bytes) -> ToWorker:
    return _to_worker.decode(body)


def from_worker(body: bytes) -> FromWorker:
    return _from_worker.decode(body)


def as_dict(msg: msgspec.Struct) -> dict[str, Any]:
    """The message as the map on the wire (for logs and tests)."""
    return msgspec.to_builtins(msg)
