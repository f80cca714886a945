"""The worker process: owns one model and one llama context, and runs up to `parallel`
requests at once with continuous batching.

Run by the daemon as `python -m llm_residentd.worker --fd N`. Fd N is a socketpair end
speaking the messages of messages.py. Each step is one llama_decode call holding the
next token of every decoding sequence and a chunk of any prompt being evaluated
(batching.py decides which). Control messages (a new request, cancel, set_threads,
preempt, KV operations, shutdown) are taken between steps, and during a step also by a
watcher thread (decodestop.py) that stops the llama_decode call in progress for a thread
change, shutdown, or a cancel or preemption of a sequence whose prompt it is evaluating,
so none of them waits for a long prompt chunk. The daemon's liveness pings are answered
at once wherever they are read: by the main loop while idle, by that thread during a step.
LoRA adapters (lora.py) are loaded once with the model; a request names one, and a step
holds only sequences of one adapter setting.
"""

from __future__ import annotations

import argparse
import codecs
import os
import random
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from ..placement.cpus import usable_cpus
from ..wire import messages as m
from ..wire.protocol import read_body
from . import batching, cachedisk, cachetypes, grammars, kvstate, llamalog, lora, memory
from .chattokens import ChatPrompt
from .decodestop import DecodeStop
from .promptcache import PromptCache
from .refusals import Refused, TooLong, Unfit
from .sampling import Picker
from .stopstrings import StopScanner

STATE_MAX = m.IPC_MAX_FRAME - (1 << 20)  # a larger saved state is recomputed instead
# Prompt tokens per step while other sequences decode. Prompt evaluation ran at about 280
# tokens/s whatever the chunk (SmolLM2-135M, 2 threads, bench/batch_chunk.py), so a small
# chunk costs only the decoding sequences' tokens in each extra step, while a large one
# holds every decoding sequence for the whole chunk: beside 4 of them a step took 21 ms
# alone, 250 ms with 64 prompt tokens, 468 ms with 128.
PREFILL_CHUNK = 64
BATCH_REPORT_S = 1.0
# Steps one LoRA adapter setting keeps while requests of another wait (batching.py). A
# switch makes llama.cpp reserve its graph again: about 5 ms with SmolLM2-135M, on steps
# of 8 ms (one sequence) to 22 ms (four; bench/adapters.py), which switching every step
# would pay every step. Once per 16 steps it is 1.4-3.8 %, and another setting waits
# 0.2-0.4 s at most.
ADAPTER_TURN = 16
DECODE_ABORTED = 2  # llama_decode: the abort callback stopped it
# A slot's cache worth keeping when a request is about to overwrite it: the tokens the
# request would lose. Fewer are cheaper to evaluate again than to copy out and back.
SAVE_MIN = 32
# A state read from disk must take at most this share of the time evaluating its tokens
# again would (both measured as the worker runs: bytes/s read, prompt tokens/s).
DISK_WORTH = 0.5
FIRST_READ_RATE = 100e6  # bytes/s assumed for the disk until a read is measured
FIRST_PREFILL_RATE = 200.0  # prompt tokens/s assumed until a prompt step is measured
SHUTDOWN_FLUSH_S = 5.0  # longest a stopping worker waits for its cache files


class Channel:
    """The socket to the daemon, with control messages that arrive during a step."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.cancelled: set[str] = set()
        self.threads_wanted: int | None = None
        self.preempts: dict[str, int] = {}  # request -> save the state from this many tokens
        self.kv_ops: list[m.TrimKv | m.ShrinkKv] = []
        self.generates: list[m.Generate] = []
        self.cache_limit: int | None = None  # asked by set_prompt_cache
        self.shutdown = False
        self.lock = threading.RLock()  # poll() runs on the main thread and the DecodeStop's
        self._send_lock = threading.Lock()  # so does send(): a pong beside the tokens

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: msgspec.Struct) -> None:
        data = m.frame(msg)
        with self._send_lock:
            self.sock.sendall(data)

    def wait(self) -> None:
        """Block until a message comes, and take it in (idle: nothing else to do)."""
        select.select([self.sock], [], [])
        self.poll()

    def poll(self) -> None:
        """Take in every message that is waiting, without blocking."""
        with self.lock:
            while not self.shutdown and select.select([self.sock], [], [], 0)[0]:
                body = read_body(self.sock, m.IPC_MAX_FRAME)
                if body is None:
                    self.shutdown = True
                    return
                try:
                    self._take(m.to_worker(body))
                except m.DecodeError as exc:  # a daemon of another version, or a bug
                    print(f"worker: ignored a message: {exc}", file=sys.stderr, flush=True)

    def _take(self, msg: m.ToWorker) -> None:
        if isinstance(msg, m.Generate):
            self.generates.append(msg)
        elif isinstance(msg, m.Cancel):
            self.cancelled.add(msg.req)
        elif isinstance(msg, m.SetThreads):
            self.threads_wanted = msg.n
        elif isinstance(msg, m.Preempt):
            self.preempts[msg.req] = msg.state_min_tokens
        elif isinstance(msg, m.TrimKv | m.ShrinkKv):
            self.kv_ops.append(msg)
        elif isinstance(msg, m.SetPromptCache):
            self.cache_limit = msg.limit
        elif isinstance(msg, m.Shutdown):
            self.shutdown = True
        elif isinstance(msg, m.Ping):
            self.send(m.Pong())


class Outbox:
    """Token text of one request, one frame per interval; the first token goes at once.

    Fewer frames leave more CPU to the model when its threads fill every core. Token bytes
    become text here (a character may span tokens), and text that could be the start of
    a stop string is held back until it is known not to be one.
    """

    def __init__(self, ch: Channel, req: str, interval: float, stops: list[str],
                 resume: m.Resume | None) -> None:
        self.ch, self.req, self.interval = ch, req, interval
        self.text, self.tokens, self.sent_at = "", 0, -interval
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.decoder.setstate((resume.pending if resume else b"", 0))
        self.stops = StopScanner(stops, resume.held if resume else "")

    def add(self, piece: bytes) -> bool:
        """A token's bytes; True once the text holds a stop string (the end)."""
        self.text += self.stops.feed(self.decoder.decode(piece))
        self.tokens += 1
        if time.monotonic() - self.sent_at >= self.interval:
            self.flush()
        return self.stops.stopped

    def finish(self) -> bool:
        """Send the rest of the text; True if it ended with a stop string."""
        self.text += self.stops.feed(self.decoder.decode(b"", final=True))
        self.text += self.stops.finish()
        self.flush()
        return self.stops.stopped

    def suspend(self) -> tuple[bytes, str]:
        """What is not sent yet (pending bytes, held text), for a preempted request."""
        self.flush()
        return self.decoder.getstate()[0], self.stops.held

    def flush(self) -> None:
        if self.text:
            self.ch.send(m.Token(req=self.req, text=self.text, tokens=self.tokens))
            self.text, self.tokens, self.sent_at = "", 0, time.monotonic()


@dataclass(eq=False)
class Run:
    """One request's sequence and what it needs beside its tokens."""

    seq: batching.Sequence
    msg: m.Generate
    out: Outbox
    picker: Picker
    prompt_tokens: int
    generated: int  # tokens generated so far, those before a preemption included
    max_tokens: int
    cached: int  # prompt tokens whose KV was in a cache when it started
    output: list[int] = field(default_factory=list)  # generated tokens, never trimmed
    first_at: float | None = None
    started: float = field(default_factory=time.monotonic)
    resumed_at: int = 0  # generated when this worker took it (for tokens/s)


class Engine:
    """One model and one context, serving `parallel` sequences (slots)."""

    def __init__(self, cfg: m.Load, channel: Channel) -> None:
        import llama_cpp  # imported here so --help stays fast
        import numpy
        from llama_cpp import _internals

        self.lib, self.np, self.internals = llama_cpp, numpy, _internals
        self.cfg, self.ch = cfg, channel
        if cfg.threads:
            self.threads, self.threads_why = cfg.threads, f"config: threads = {cfg.threads}"
        else:
            self.threads, self.threads_why = usable_cpus()
        llamalog.install(llama_cpp)
        llama_cpp.llama_backend_init()
        self.model = _internals.LlamaModel(path_model=cfg.path, verbose=False,
                                           params=llama_cpp.llama_model_default_params())
        self.n_vocab = self.model.n_vocab()
        self.type_k, self.type_v = cachetypes.ggml_types(llama_cpp, self.model.model,
                                                         cfg.cache_type_k, cfg.cache_type_v)
        self.adapters = lora.Adapters(llama_cpp, self.model.model, cfg.adapters)
        self.stop = DecodeStop(channel, self._must_stop)
        self.ctx: Any = None
        self.n_ctx = cfg.n_ctx  # per sequence; a shrink lowers it
        self._open(cfg.n_ctx)
        self.batch = _internals.LlamaBatch(n_tokens=cfg.n_batch, embd=0, n_seq_max=1,
                                           verbose=False)
        self.batcher = batching.Batcher(cfg.parallel, cfg.n_batch, min(PREFILL_CHUNK, cfg.n_batch),
                                        turn=ADAPTER_TURN)
        self.runs: dict[str, Run] = {}
        self.step_prefill: set[str] = set()  # requests whose prompt the current step holds
        self.chat = ChatPrompt.of(llama_cpp, self.model) if cfg.chat_template else None
        self._pieces: dict[int, bytes] = {}  # token -> its bytes; one entry per vocab token
        self._report = {"steps": 0, "tokens": 0, "sequences": 0}
        self._reported_at = time.monotonic()
        self.disk: cachedisk.Disk | None = None
        self.cache = self._prompt_cache(cfg)
        self._cache_sent: m.CacheStats | None = None
        self.read_rate, self.prefill_rate = FIRST_READ_RATE, FIRST_PREFILL_RATE

    def _prompt_cache(self, cfg: m.Load) -> PromptCache | None:
        """The prompt cache (promptcache.py), with its files (cachedisk.py) when the
        daemon gave a directory; None when the config turns it off."""
        if cfg.prompt_cache <= 0:
            return None
        memory.large_allocations_mapped()
        disk = None
        if cfg.prompt_cache_disk > 0 and cfg.prompt_cache_dir:
            identity = {"format": 1, "model": cachedisk.model_identity(cfg.path),
                        "llama_cpp": self.lib.__version__, "n_ctx": cfg.n_ctx,
                        "flash_attn": cfg.flash_attn, "cache_type_k": cfg.cache_type_k,
                        "cache_type_v": cfg.cache_type_v}
            disk = cachedisk.Disk(Path(cfg.prompt_cache_dir), cfg.prompt_cache_disk, identity,
                                  warn=_warn)
        self.disk = disk
        cache = PromptCache(cfg.prompt_cache, disk)
        for entry in disk.load() if disk is not None else ():
            cache.add_from_disk(entry)
        return cache

    # -- the context -------------------------------------------------------------

    def _open(self, n_ctx: int) -> None:
        """A context of n_ctx tokens per sequence, each sequence in a KV stream of its own
        (llama-server's layout with -np N): a sequence's attention reads its own cells
        only. One buffer for all (kv_unified) made a step of 8 decoding sequences 7 %
        slower at 64 cells each and 24 % at 512 (its attention scans every sequence's
        cells). llama.cpp splits a step into ubatches of consecutive sequence ids with
        equal token counts, so the batch lists the sequences in slot order and the
        batcher keeps the busy slots together."""
        lib, cfg = self.lib, self.cfg
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx * cfg.parallel
        params.n_batch = params.n_ubatch = cfg.n_batch
        params.n_seq_max = cfg.parallel
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = self.threads
        # llama-server turns flash attention on for the CPU (-fa auto), llama-cpp-python
        # leaves it off. On: decode +7 %, TTFT -15 ms (SmolLM2-135M, 2 threads, measured
        # beside llama-server); the text then matches llama-server's.
        params.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if cfg.flash_attn
                                  else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        # The KV cache's types (models.NAME.cache_type_k/v): a quantized one holds a cell
        # in about half (q8_0) or a quarter (q4_0) of the bytes f16 takes.
        params.type_k, params.type_v = self.type_k, self.type_v
        params.no_perf = True
        self._context = self.internals.LlamaContext(model=self.model, params=params,
                                                    verbose=False)
        self.ctx = self._context.ctx
        self.n_ctx = n_ctx
        self.adapters.forget_context()
        self.stop.install(lib, self.ctx)

    def _close(self) -> None:
        self._context.close()
        self.ctx = None

    def tokens(self, params: m.RequestParams) -> list[int]:
        """The request's prompt tokens: its prompt as a user message, or its messages, in
        the model's chat template (chattokens.py: their content stays text); a raw prompt
        (or any, without a template) as is."""
        messages = params.messages
        if messages is None and (self.chat is None or params.raw):
            return self.model.tokenize(params.prompt.encode(), add_bos=True, special=False)
        if self.chat is None:
            raise Refused("messages", "messages need a chat template, and this model has "
                          "none (no tokenizer.chat_template in its GGUF, or its config sets "
                          "chat_template = false): send a prompt instead")
        from jinja2 import TemplateError

        try:
            return self.chat.tokens(messages or [{"role": "user", "content": params.prompt}])
        except TemplateError as exc:
            raise Refused("messages", f"the model's chat template failed on these "
                          f"messages: {type(exc).__name__}: {exc}") from None

    # -- threads -----------------------------------------------------------------

    def set_threads(self, n: int) -> None:
        self.threads = max(1, n)
        self.lib.llama_set_n_threads(self.ctx, self.threads, self.threads)

    def take_threads(self, stage: str = "idle", at: int = 0, redone: bool = False) -> None:
        """Apply a thread count the daemon asked for, for decoding and prompt evaluation
        alike; called only between llama_decode calls. The answer says where: idle, or in
        a prefill or decode step after `at` tokens, and whether the call in progress was
        stopped to take it and made again (redone)."""
        with self.ch.lock:
            n, self.ch.threads_wanted = self.ch.threads_wanted, None
        if n is not None:
            self.set_threads(n)
            self.ch.send(m.Threads(n=self.threads, stage=stage, at=at, redone=redone))

    def _must_stop(self) -> bool:
        """Whether the step in progress stops: a thread change or shutdown, or a cancel or
        preemption of a sequence whose prompt it evaluates (a decoding sequence's token
        is worth the short wait)."""
        ch = self.ch
        return (ch.threads_wanted is not None or ch.shutdown
                or any(r in ch.cancelled or r in ch.preempts for r in self.step_prefill))

    # -- requests come and go --------------------------------------------------------

    def take_control(self) -> None:
        """Between steps: new requests, cancels, preemptions and KV operations."""
        with self.ch.lock:
            generates, self.ch.generates = self.ch.generates, []
        for msg in generates:
            self._start(msg)
        with self.ch.lock:
            cancelled, self.ch.cancelled = self.ch.cancelled, set()
            preempts, self.ch.preempts = self.ch.preempts, {}
        for req in cancelled & self.runs.keys():
            run = self._end(req)
            run.out.flush()
            self.ch.send(m.Done(req=req, cancelled=True, completion_tokens=run.generated,
                                stage="prefill" if run.first_at is None else "decode"))
        for req, state_min in preempts.items():
            if req in self.runs:
                self._preempt(req, state_min)
        while self.ch.kv_ops and not self._kv_op_waits(self.ch.kv_ops[0]):
            self.ch.send(self.kv_op(self.ch.kv_ops.pop(0)))
        self.set_cache_limit()

    def _kv_op_waits(self, op: m.TrimKv | m.ShrinkKv) -> bool:
        """A trim waits until its sequence (named, or the one holding most) has evaluated
        its prompt: before that its cache holds little to trim."""
        if not isinstance(op, m.TrimKv) or not self.runs:
            return False
        run = self.runs.get(op.req) if op.req else self._most_cells()
        return run is not None and not run.seq.decoding

    def _most_cells(self) -> Run:
        return max(self.runs.values(), key=lambda r: (r.seq.done, len(r.seq.tokens)))

    def _start(self, msg: m.Generate) -> None:
        try:
            self._admit(msg)
        except TooLong as exc:
            self.ch.send(m.Error(req=msg.req, code="too_long", message=str(exc)))
        except ValueError as exc:
            self.ch.send(m.Error(req=msg.req, code="bad_request", message=str(exc),
                                 param=getattr(exc, "param", None)))
        except Exception as exc:  # report, then keep serving the others
            self.ch.send(m.Error(req=msg.req, code="internal",
                                 message=f"{type(exc).__name__}: {exc}"))

    def _admit(self, msg: m.Generate) -> None:
        if msg.req in self.runs:
            raise ValueError(f"request {msg.req} runs already")
        if not self.batcher.free:
            raise RuntimeError(f"all {self.batcher.slots} slots are busy")
        resume, p = msg.resume, msg.params
        adapter = self.adapters.key(p.adapter, p.adapter_scale)
        grammar = grammars.from_request(self.lib, self.model.vocab,
                                        {"json_schema": p.json_schema, "grammar": p.grammar})
        if resume:
            context, prompt_tokens, generated = list(resume.context), resume.prompt_tokens, \
                resume.generated
            output = list(resume.output)
            self._make_room(len(context) + p.max_tokens - generated)
            if len(context) >= self.n_ctx:
                raise TooLong(f"the preempted request holds {len(context)} tokens; this "
                              f"worker's context holds {self.n_ctx}")
            max_tokens = p.max_tokens
        else:
            context = self.tokens(p)
            prompt_tokens, generated, output = len(context), 0, []
            self._make_room(len(context) + p.max_tokens)
            if len(context) >= self.n_ctx:
                raise TooLong(f"the prompt is {len(context)} tokens; the context holds "
                              f"{self.n_ctx} and needs room for at least one more")
            max_tokens = min(p.max_tokens, self.n_ctx - len(context))
        # Seed every request: the request's, else the worker's, else a fresh one.
        seed = next((x for x in (p.seed, self.cfg.seed) if x >= 0), random.randrange(2**31))
        sampling = {"top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
                    "temp": p.temperature, "repeat_penalty": p.repeat_penalty}
        picker = Picker(self.lib, self.np, self.model, sampling, seed, grammar, output)
        seq = self._take_slot(msg.req, context, adapter)
        if resume and resume.state and seq.done < len(context) - 1:
            if kvstate.restore(self.ctx, seq.slot, resume.state):
                seq.done = len(context) - 1
            else:  # the prefix is recomputed instead
                seq.done = 0
        out = Outbox(self.ch, msg.req, self.cfg.stream_interval, p.stop, resume)
        self.runs[msg.req] = Run(seq, msg, out, picker, prompt_tokens, generated, max_tokens,
                                 min(seq.done, prompt_tokens), output, resumed_at=generated)

    # -- the prompt cache ------------------------------------------------------------

    def _take_slot(self, req: str, context: list[int], adapter: Any) -> batching.Sequence:
        """A slot for the context, with as much of its KV as a cache holds: the slot's
        own, or the prompt cache's longest prefix copied in. What the slot held goes to
        the prompt cache first if the new sequence would lose it."""
        slot, _ = self.batcher.pick(context, adapter)
        cache = self.cache
        if cache is not None:
            self._keep(slot, context)
        seq = self.batcher.admit(req, context, adapter, slot)
        if cache is None or not self._restore(seq, *cache.best(context, adapter)):
            kvstate.drop(self.ctx, seq.slot, seq.done)
        return seq

    def _keep(self, slot: int, context: list[int]) -> None:
        """Put a free slot's cached tokens in the prompt cache unless the next sequence
        keeps them (it shares all but SAVE_MIN of them) or the cache has them already."""
        held, adapter = self.batcher.held(slot)
        if len(held) - batching.common_prefix(held, context) < SAVE_MIN:
            return
        if self.cache.covers(held, adapter):
            return
        state = kvstate.save(self.ctx, slot, self.cache.limit)
        if state is not None:
            self.cache.put(held, adapter, state)

    def _restore(self, seq: batching.Sequence, entry: Any, n: int) -> bool:
        """Copy a prompt cache entry sharing n tokens with seq into its slot if that beats
        what the slot holds; True if the slot was rewritten (seq.done says how much holds)."""
        cache = self.cache
        n = min(n, len(seq.tokens) - 1)
        if entry is None or n < seq.done + batching.MIN_REUSE:
            if seq.done < batching.MIN_REUSE:
                cache.counters.misses += 1
            return False
        if entry.state is None and entry.size / self.read_rate > \
                DISK_WORTH * (n - seq.done) / self.prefill_rate:
            return False  # reading it would cost more than evaluating it again
        t0 = time.monotonic()
        from_disk = entry.state is None
        state = cache.state_of(entry)
        if state is None:  # its file was gone or broken (logged)
            return False
        if from_disk:
            self.read_rate = _ema(self.read_rate, len(state) / max(time.monotonic() - t0, 1e-4))
        if not kvstate.restore(self.ctx, seq.slot, state):
            seq.done = 0  # the slot is empty now
            return True
        kvstate.drop(self.ctx, seq.slot, n)
        seq.done = n
        c = cache.counters
        c.hits += 1
        c.disk_hits += from_disk
        c.tokens_reused += n
        c.restore_s += time.monotonic() - t0
        return True

    def cache_stats(self) -> m.CacheStats:
        cache = self.cache
        if cache is None:
            return m.CacheStats()
        c, disk = cache.counters, self.disk
        return m.CacheStats(
            entries=cache.in_memory, bytes=cache.bytes, limit=cache.limit,
            disk_entries=len(disk) if disk is not None else 0,
            disk_bytes=disk.bytes if disk is not None else 0,
            disk_limit=disk.limit if disk is not None else 0,
            disk_error=disk.error if disk is not None else None,
            hits=c.hits, disk_hits=c.disk_hits, misses=c.misses, tokens_reused=c.tokens_reused,
            restore_s=round(c.restore_s, 6), saved=c.saved, evicted=c.evicted)

    def set_cache_limit(self) -> None:
        """A set_prompt_cache from the daemon: fit the cache to it and say what went."""
        with self.ch.lock:
            limit, self.ch.cache_limit = self.ch.cache_limit, None
        if limit is None:
            return
        n, freed = self.cache.fit(max(0, limit)) if self.cache else (0, 0)
        if freed:
            memory.give_back()
        self._cache_sent = self.cache_stats()
        self.ch.send(m.PromptCache(stats=self._cache_sent, asked=True, freed_entries=n,
                                   freed_bytes=freed))

    def keep_all(self) -> None:
        """A stopping worker: every slot's tokens go to the prompt cache, and the cache's
        files are written before it exits, so the next worker finds them."""
        cache = self.cache
        if cache is None or self.disk is None:
            return
        for slot in range(self.batcher.slots):
            run = next((r for r in self.runs.values() if r.seq.slot == slot), None)
            held, adapter = ((run.seq.tokens[:run.seq.done], run.seq.adapter) if run
                             else self.batcher.held(slot))
            if len(held) >= SAVE_MIN and not cache.covers(held, adapter):
                state = kvstate.save(self.ctx, slot, cache.limit)
                if state is not None:
                    cache.put(held, adapter, state)
        self.disk.flush(SHUTDOWN_FLUSH_S)

    def _end(self, req: str, keep_cache: bool = True) -> Run:
        run = self.runs.pop(req)
        self.batcher.release(req, keep_cache)
        if not keep_cache:
            kvstate.drop(self.ctx, run.seq.slot)
        run.picker.close()
        return run

    def _drop_caches(self) -> int:
        """Free slots forget their caches; returns how many tokens they held."""
        held = self.batcher.cached_tokens()
        for slot in self.batcher.forget_caches():
            kvstate.drop(self.ctx, slot)
        return held

    def _preempt(self, req: str, state_min_tokens: int) -> None:
        """Give up req's slot: another worker (or this one later) continues it from its
        tokens and, for a long context, its saved KV (short ones are cheaper to
        recompute). Its slot keeps the cache, so a resume here evaluates nothing again."""
        run = self.runs[req]
        seq = run.seq
        state = None
        if seq.done >= state_min_tokens and seq.done == len(seq.tokens) - 1:
            state = kvstate.save(self.ctx, seq.slot, STATE_MAX)
        pending, held = run.out.suspend()
        resume = m.Resume(context=list(seq.tokens), prompt_tokens=run.prompt_tokens,
                          generated=run.generated, output=run.output, state=state,
                          pending=pending, held=held)
        self._end(req)
        self.ch.send(m.Preempted(req=req, resume=resume))

    def _make_room(self, tokens: int) -> None:
        """A context shrunk under memory pressure grows back for a request that needs it."""
        if self.n_ctx < self.cfg.n_ctx and tokens > self.n_ctx:
            report = self.kv_op(m.ShrinkKv(n_ctx=self.cfg.n_ctx))
            report.op, report.asked = "grow_kv", False
            self.ch.send(report)

    # -- steps -------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.runs)

    def step(self) -> None:
        """One llama_decode call over the batch the batcher plans, then a token for every
        sequence whose logits it computed."""
        pieces = self.batcher.plan()
        if not pieces:
            return
        outputs = self._fill(pieces)
        self.adapters.apply(self.ctx, pieces[0].seq.adapter)  # one setting per step
        self.step_prefill = {p.seq.req for p in pieces if p.prefill}
        t0 = time.monotonic()
        try:
            if not self._decode(pieces):
                return  # stopped for a cancel, preemption or shutdown: taken next
        finally:
            self.step_prefill = set()
        prompt = sum(p.count for p in pieces if p.prefill)
        if prompt >= PREFILL_CHUNK:  # what evaluating a cached prompt again would cost
            took = max(time.monotonic() - t0, 1e-4)
            self.prefill_rate = _ema(self.prefill_rate, sum(p.count for p in pieces) / took)
        self.batcher.advance(pieces)
        self._count(pieces)
        now = time.monotonic()
        for piece, index in outputs:
            run = self.runs.get(piece.seq.req)
            if run is not None:
                run.first_at = run.first_at or now
                self._next_token(run, run.picker.pick(self.ctx, index))

    def _fill(self, pieces: list[batching.Piece]) -> list[tuple[batching.Piece, int]]:
        """Write the pieces into the llama_batch; returns the output row of each piece
        whose logits are wanted."""
        b = self.batch.batch
        n, outputs = 0, []
        for p in sorted(pieces, key=lambda p: p.seq.slot):
            tokens, slot = p.seq.tokens, p.seq.slot
            for k in range(p.count):
                pos = p.start + k
                b.token[n], b.pos[n], b.n_seq_id[n] = tokens[pos], pos, 1
                b.seq_id[n][0] = slot
                b.logits[n] = False
                n += 1
            if p.logits:
                b.logits[n - 1] = True
                outputs.append((p, n - 1))
        b.n_tokens = n
        return outputs

    def _decode(self, pieces: list[batching.Piece]) -> bool:
        """llama_decode with the thread count asked for; a call stopped for a thread change
        is made again with it. False when the step must give way (cancel, preemption of
        a prompt in it, shutdown). A call that did not finish leaves the ubatches before
        the failed one in the cache: the step's positions are dropped before it is made
        again or given up."""
        prefill = any(p.prefill for p in pieces)
        stage, at = ("prefill", min(p.start for p in pieces if p.prefill)) if prefill else \
            ("decode", max(p.start for p in pieces))
        redone = False
        while True:
            self.stop.clear()
            if self._must_stop() and self.ch.threads_wanted is None:
                return False
            self.take_threads(stage, at, redone)
            rc = self.lib.llama_decode(self.ctx, self.batch.batch)
            if rc == 0:
                return True
            for p in pieces:
                kvstate.drop(self.ctx, p.seq.slot, p.start)
            if rc == DECODE_ABORTED:
                if self.ch.threads_wanted is not None or not self._must_stop():
                    redone = True
                    continue
                return False
            if rc == 1 and self._drop_caches():  # room for this step
                continue
            raise RuntimeError(f"llama_decode returned {rc} for a step of "
                               f"{self.batch.batch.n_tokens} tokens")

    def _next_token(self, run: Run, token: int) -> None:
        seq, finish = run.seq, None
        if self.lib.llama_vocab_is_eog(self.model.vocab, token) and not run.msg.params.ignore_eos:
            finish = "stop"
        else:
            run.generated += 1
            seq.tokens.append(token)
            run.output.append(token)
            piece = self._pieces.get(token)
            if piece is None:
                piece = self._pieces[token] = self.model.detokenize([token])
            if run.out.add(piece):
                finish = "stop"  # a stop string
            elif run.generated >= run.max_tokens or len(seq.tokens) >= self.n_ctx:
                finish = "length"
        if finish is not None:
            self._finish(run, finish)

    def _finish(self, run: Run, finish: str) -> None:
        if run.out.finish():  # a stop string that the last bytes completed
            finish = "stop"
        self._end(run.seq.req)
        done = time.monotonic()
        decode_s = done - run.first_at if run.first_at else 0.0
        new = run.generated - run.resumed_at
        self.ch.send(m.Done(req=run.seq.req, stats=m.Stats(
            prompt_tokens=run.prompt_tokens, completion_tokens=run.generated,
            cached_tokens=run.cached, finish_reason=finish,
            prefill_s=(run.first_at or done) - run.started,
            tokens_per_s=(new - 1) / decode_s if new > 1 and decode_s > 0 else None)))

    def fail_all(self, why: str) -> None:
        """A step failed: its sequences cannot go on (their KV is unknown)."""
        for req in list(self.runs):
            self._end(req, keep_cache=False)
            self.ch.send(m.Error(req=req, code="internal", message=why))

    def _count(self, pieces: list[batching.Piece]) -> None:
        r = self._report
        r["steps"] += 1
        r["tokens"] += sum(p.count for p in pieces)
        r["sequences"] += len(pieces)

    def report(self, force: bool = False) -> None:
        """The Batch message, and a PromptCache one if it changed: at most once a second
        while busy, and once going idle."""
        now = time.monotonic()
        if not force and now - self._reported_at < BATCH_REPORT_S:
            return
        if self.cache is not None and (stats := self.cache_stats()) != self._cache_sent:
            self._cache_sent = stats
            self.ch.send(m.PromptCache(stats=stats))
        if not self._report["steps"]:
            return
        self.ch.send(m.Batch(**self._report,
                             cells={req: r.seq.done for req, r in self.runs.items()}))
        self._report = {"steps": 0, "tokens": 0, "sequences": 0}
        self._reported_at = now

    # -- KV operations -------------------------------------------------------------

    def kv_op(self, op: m.TrimKv | m.ShrinkKv) -> m.Kv:
        """Trim a sequence's cache (trim_kv) or reopen with a smaller context per sequence
        (shrink_kv), between steps; returns the report for the daemon."""
        t0, rss0 = time.monotonic(), _rss()
        before = self._held()
        if isinstance(op, m.TrimKv):
            req, result = self._trim(op)
        else:
            req, result = None, self._shrink(op)
        return m.Kv(op="trim_kv" if isinstance(op, m.TrimKv) else "shrink_kv", result=result,
                    tokens_before=before, tokens_after=self._held(), n_ctx=self.n_ctx,
                    rss_before=rss0, rss_after=_rss(), req=req,
                    ms=round((time.monotonic() - t0) * 1000, 3))

    def _held(self) -> int:
        return sum(r.seq.done for r in self.runs.values()) + self.batcher.cached_tokens()

    def _trim(self, op: m.TrimKv) -> tuple[str | None, str]:
        """Keep the first `keep` and last `tail` cached tokens of a sequence (op.req's, or
        the one holding most) if `min_prune` can go; idle, drop every cache."""
        if not self.runs:
            return None, f"cleared {self._drop_caches()} cached tokens (idle)"
        run = self.runs.get(op.req) if op.req else self._most_cells()
        if run is None:
            return op.req, f"skipped: {op.req} does not run here"
        return run.seq.req, self._trim_seq(run.seq, op.keep, op.tail, op.min_prune)

    def _trim_seq(self, seq: batching.Sequence, keep: int, tail: int, min_prune: int) -> str:
        held = seq.done
        drop = held - keep - tail
        if drop < max(1, min_prune):
            return f"skipped: {held} tokens, keep {keep} + tail {tail} free under {min_prune}"
        if not kvstate.trim(self.ctx, seq.slot, held, keep, drop):
            return "unsupported: this model's cache cannot shift positions"
        del seq.tokens[keep:keep + drop]
        seq.done -= drop
        seq.shifted = True
        return f"trimmed {drop} tokens"

    def _shrink(self, op: m.ShrinkKv) -> str:
        """Reopen the context with op.n_ctx tokens per sequence. Each running sequence's
        KV is saved and restored (trimmed first if too long), so the continuations are
        unchanged; the free slots' caches are dropped."""
        n_ctx = op.n_ctx
        if n_ctx == self.n_ctx:
            return f"unchanged: n_ctx is {n_ctx}"
        notes = []
        for run in self.runs.values():
            if len(run.seq.tokens) + 1 > n_ctx:
                notes.append(self._trim_seq(run.seq, op.keep, op.tail, 0))
                if len(run.seq.tokens) + 1 > n_ctx:
                    return (f"refused: {run.seq.req}'s {len(run.seq.tokens)} tokens do not "
                            f"fit n_ctx {n_ctx} ({notes[-1]})")
        states = {req: kvstate.save(self.ctx, r.seq.slot, 1 << 62) if r.seq.done else None
                  for req, r in self.runs.items()}
        self.batcher.forget_caches()
        old = self.n_ctx
        self._close()
        self._open(n_ctx)
        self.set_threads(self.threads)
        for req, state in states.items():
            seq = self.runs[req].seq
            if state is None or not kvstate.restore(self.ctx, seq.slot, state):
                seq.done = 0  # the next steps evaluate the context again
        return f"n_ctx {old} -> {self.n_ctx}"


def _ema(old: float, new: float, weight: float = 0.2) -> float:
    return old + weight * (new - old)


def _warn(text: str) -> None:
    """A warning for the daemon's log (it relays the worker's stderr)."""
    print(f"worker: {text}", file=sys.stderr, flush=True)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def serve(ch: Channel, engine: Engine) -> None:
    """Steps while sequences run; between them, whatever the daemon sent."""
    while True:
        if not engine.busy:
            engine.report(force=True)
            engine.stop.disarm()  # the main thread reads the socket itself now
            engine.take_threads()
            # The watcher may have taken messages in since the last step.
            if not (ch.shutdown or ch.generates or ch.kv_ops or ch.cancelled or ch.preempts
                    or ch.cache_limit is not None):
                ch.wait()
        else:
            ch.poll()
        if ch.shutdown:
            engine.keep_all()
            return
        engine.take_control()
        if engine.busy:
            engine.stop.arm()
            try:
                engine.step()
            except Exception as exc:  # the step's sequences fail; the worker goes on
                engine.fail_all(f"{type(exc).__name__}: {exc}")
            engine.report()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-residentd-worker",
                                     description="llm-residentd model worker (started by the daemon)")
    parser.add_argument("--fd", type=int, required=True, help="socketpair fd to the daemon")
    parser.add_argument("--name", default="worker", help="worker name, for process listings")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when workers stop
    ch = Channel(socket.socket(fileno=args.fd))
    body = read_body(ch.sock, m.IPC_MAX_FRAME)
    try:
        cfg = m.to_worker(body) if body is not None else None
    except m.DecodeError as exc:
        print(f"worker: bad load message: {exc}", file=sys.stderr)
        return 2
    if not isinstance(cfg, m.Load):
        return 2
    try:  # e.g. a file that daemon.worker_user may not read
        open(cfg.path, "rb").close()
    except PermissionError:
        ch.send(m.LoadFailed(message=f"cannot read {cfg.path} as uid {os.getuid()}: the "
                             "workers' user (daemon.worker_user) must be able to read it"))
        return 1
    except OSError:
        pass  # the load below reports it
    t0 = time.monotonic()
    with llamalog.errors() as caught:  # llama.cpp logs why a load fails; the call does not say
        try:
            engine = Engine(cfg, ch)
        except Unfit as exc:
            ch.send(m.LoadFailed(message=str(exc), param=exc.param))
            return 1
        except Exception as exc:
            why = llamalog.reason(caught)
            ch.send(m.LoadFailed(message=f"cannot load {cfg.path}: {exc}" + (f" ({why})" if why else ""),
                                 param=cachetypes.setting_of(why)))
            return 1
    ch.send(m.Ready(pid=os.getpid(), threads=engine.threads, threads_why=engine.threads_why,
                    n_ctx=engine.n_ctx, slots=cfg.parallel, load_s=time.monotonic() - t0,
                    chat_template=engine.chat is not None,
                    adapters=engine.adapters.status()))
    serve(ch, engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
