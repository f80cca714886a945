"""Spawn and supervise worker processes; relay work to them and their tokens back."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec
import structlog

from ..catalog.config import Config, ModelConfig
from ..control import procstats
from ..placement.scopes import Scope
from ..placement.users import run_as
from ..wire import messages
from ..wire.messages import IPC_MAX_FRAME, Batch
from ..wire.protocol import ProtocolError, read_frame
from .requests import Request
from .supervision import Backoff, Clock, ping_period

LOAD_TIMEOUT = 600.0


def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL proc, leaving its exit status to asyncio's child watcher.

    Process.kill() first polls with waitpid(); when the child has just died, that poll
    reaps it and the watcher then reports exit code 255 instead of the signal.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


class Listener(Protocol):
    config: Config  # read at each use: a reload changes it

    async def model_path(self, model: str) -> Path: ...
    def worker_idle(self, worker: Worker) -> None: ...  # loaded, or a slot came free
    def worker_done(self, worker: Worker, req: Request, msg: messages.Done) -> None: ...
    def worker_error(self, worker: Worker, req: Request, code: str, message: str,
                     param: str | None = None) -> None: ...
    def worker_lost(self, worker: Worker, req: Request, code: str, message: str) -> None: ...
    def worker_load_failed(self, worker: Worker) -> None: ...
    def oom_killed(self, worker: Worker) -> bool: ...
    def worker_preempted(self, worker: Worker, req: Request,
                         resume: messages.Resume) -> None: ...
    def worker_kv(self, worker: Worker, report: messages.Kv) -> None: ...
    def prompt_cache(self, worker: Worker) -> tuple[int, int, str]: ...  # memory, disk, dir
    async def place(self, worker: Worker) -> None: ...
    async def release(self, worker: Worker) -> None: ...


class LoadFailed(Exception):
    pass


@dataclass
class BatchTally:
    """A worker's Batch reports: totals since the daemon started (its processes summed),
    the mean batch size of the last report, and the KV cells of each running sequence."""

    steps: int = 0
    tokens: int = 0
    sequences: int = 0
    last_size: float | None = None  # sequences per step in the last report that had steps
    cells: dict[str, int] = field(default_factory=dict)  # request -> KV cells now

    def add(self, report: Batch) -> None:
        self.steps += report.steps
        self.tokens += report.tokens
        self.sequences += report.sequences
        if report.steps:
            self.last_size = report.sequences / report.steps
        self.cells = dict(report.cells)

    def describe(self) -> dict[str, Any]:
        size = None if self.last_size is None else round(self.last_size, 3)
        return {"steps": self.steps, "tokens": self.tokens, "sequences": self.sequences,
                "size": size}


@dataclass
class CacheTally:
    """A worker's prompt cache reports: what the current process holds, and its counters
    summed over the worker's processes since the daemon started."""

    now: messages.CacheStats = field(default_factory=messages.CacheStats)
    before: dict[str, float] = field(default_factory=dict)  # earlier processes' counters
    COUNTERS = ("hits", "disk_hits", "misses", "tokens_reused", "restore_s", "saved",
                "evicted")

    def add(self, stats: messages.CacheStats) -> None:
        if any(getattr(stats, k) < getattr(self.now, k) for k in self.COUNTERS):
            for k in self.COUNTERS:  # a new process counts from 0
                self.before[k] = self.before.get(k, 0) + getattr(self.now, k)
        self.now = stats

    def describe(self) -> dict[str, Any]:
        out = messages.as_dict(self.now)
        for k in self.COUNTERS:
            out[k] = round(out[k] + self.before.get(k, 0), 6)
        return out


class Worker:
    """One model worker process, restarted with exponential backoff when it dies, and
    killed and restarted when it stops answering (supervision.py decides the waits).

    It runs up to `slots` requests at once (the worker's batch); the daemon sends a
    request only into a free slot, so `running` never holds more than the worker has.
    """

    def __init__(self, model: ModelConfig, index: int, listener: Listener,
                 backoff_max: float, user: str = "", *, clock: Clock = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.model = model
        self.user = user  # daemon.worker_user
        self.index = index
        self.name = f"{model.name}-{index}"
        self.listener = listener
        self.backoff = Backoff(backoff_max, clock)
        self._clock, self._sleep = clock, sleep
        self.state = "starting"
        self.pid: int | None = None
        self.threads = 0
        self.threads_why = ""  # what set the count: config, affinity, quota, contention
        self.threads_asked: int | None = None  # sent, not yet confirmed by the worker
        self._threads_why_asked = ""
        self.n_ctx = 0  # tokens per sequence
        self.slots = 0  # sequences the process runs at once; 0 before it is ready
        self.batch = BatchTally()
        self.cache = CacheTally()
        self.served = 0
        self.restarts = 0
        # How its processes ended when not asked to: oom, signal, exit, hung, load_failed.
        self.deaths: collections.Counter[str] = collections.Counter()
        self._ended = ""  # the cause _reap found, until supervise counts it
        self.process = procstats.Sampler()
        self.last_error = ""
        self.load_error = ""  # set while the model cannot be loaded
        self.load_failures = 0  # failed loads in a row
        self.adapter_errors: dict[str, str] = {}  # LoRA adapters it could not load, why
        self._heard_at = 0.0  # when the process last sent anything (clock())
        self._hung = ""  # why the liveness check killed the process, until it is reaped
        self.running: dict[str, Request] = {}  # by id, in the order they started
        self.scope: Scope | None = None
        self.scope_error = ""
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stopping = False
        self.log = structlog.get_logger().bind(worker=self.name)

    @property
    def serving(self) -> bool:
        """Loaded and taking requests (idle or busy), not retiring."""
        return self.state in ("idle", "busy") and not self._stopping

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - len(self.running)) if self.serving else 0

    # -- supervision ---------------------------------------------------------

    async def supervise(self) -> None:
        while not self._stopping:
            reader, failed, served = None, "", self.served
            try:
                reader = await self._spawn_and_load()
            except LoadFailed as exc:
                failed = str(exc)
            if reader is not None:
                self.backoff.up()
                self.load_failures = 0
                self.state = "idle"
                self.listener.worker_idle(self)
                await self._serve(reader)
            oom = await self._reap()
            # An OOM kill is named even while loading: a model too big for memory.max.
            cause = "load_failed" if failed and self._ended != "oom" else self._ended
            if cause and not self._stopping:
                self.deaths[cause] += 1
            if failed:
                self.last_error = self.load_error = f"{failed}; {oom}" if oom else failed
                self.load_failures += 1
                self.log.error("worker_load_failed", error=self.load_error,
                               load_failures=self.load_failures)
                self.listener.worker_load_failed(self)
            if self._stopping:
                break
            delay = self.backoff.failed(served=self.served > served)
            self.state = "restarting" if reader is not None else "failed"
            self.restarts += 1
            self.log.warning("worker_restart_scheduled", delay_s=delay,
                             failures=self.backoff.failures)
            await self._sleep(delay)
            self.backoff.retry_at = None
        self.state = "stopped"

    async def _spawn_and_load(self) -> asyncio.StreamReader | None:
        self.state = "starting"
        try:
            path = await self.listener.model_path(self.model.name)
        except Exception as exc:
            raise LoadFailed(str(exc)) from None
        try:
            creds = run_as(self.user)
        except KeyError:
            raise LoadFailed(f"daemon.worker_user: no user {self.user!r}") from None
        parent, child = socket.socketpair()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "llm_residentd.worker", "--fd", str(child.fileno()),
                "--name", self.name, pass_fds=[child.fileno()],
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, **creds)
        except OSError as exc:  # e.g. the workers' user may not run this Python
            parent.close()
            raise LoadFailed(f"cannot start a worker process ({sys.executable}"
                             f"{' as ' + self.user if creds else ''}): {exc}") from None
        finally:
            child.close()
        self.pid = self._proc.pid
        asyncio.get_running_loop().create_task(self._drain_stderr(self._proc.stderr))
        await self.listener.place(self)  # into its scope before the model is loaded
        reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        m = self.model
        cache, disk, cache_dir = self.listener.prompt_cache(self)
        self._send(messages.Load(
            path=str(path), n_ctx=m.n_ctx, n_batch=m.n_batch, threads=m.threads,
            chat_template=m.chat_template, seed=m.seed, stream_interval=m.stream_interval,
            flash_attn=m.flash_attn, cache_type_k=m.cache_type_k, cache_type_v=m.cache_type_v,
            parallel=m.parallel, adapters=m.adapters,
            prompt_cache=cache, prompt_cache_disk=disk, prompt_cache_dir=cache_dir))
        try:
            msg = await asyncio.wait_for(self._recv(reader), LOAD_TIMEOUT)
        except (TimeoutError, ProtocolError, OSError, messages.DecodeError) as exc:
            raise LoadFailed(f"no answer to load: {exc}") from None
        if msg is None:
            tail = self._tail()
            raise LoadFailed(f"worker exited while loading {path}" + (f": {tail}" if tail else ""))
        if isinstance(msg, messages.LoadFailed):
            raise LoadFailed(f"models.{m.name}.{msg.param}: {msg.message}" if msg.param
                             else msg.message)
        if not isinstance(msg, messages.Ready):
            raise LoadFailed(f"unexpected reply {messages.as_dict(msg)!r}")
        self._heard_at = self._clock()
        self.threads, self.n_ctx, self.slots = msg.threads, msg.n_ctx, msg.slots
        self.threads_why, self.threads_asked = msg.threads_why, None
        self.load_error = ""  # last_error stays: status says why the last process ended
        self.log.info("worker_ready", pid=self.pid, path=str(path), threads=self.threads,
                      n_ctx=self.n_ctx, slots=self.slots, load_s=round(msg.load_s, 3))
        self.adapter_errors = {k: v for k, v in msg.adapters.items() if v}
        for name, why in self.adapter_errors.items():  # its requests fail; the rest serve
            self.log.warning("adapter_failed", adapter=name, path=m.adapters.get(name),
                             error=why)
        return reader

    async def _recv(self, reader: asyncio.StreamReader) -> messages.FromWorker | None:
        body = await read_frame(reader, IPC_MAX_FRAME)
        return None if body is None else messages.from_worker(body)

    async def _serve(self, reader: asyncio.StreamReader) -> None:
        """Relay the worker's messages, checking that it lives, until its stream ends."""
        watch = asyncio.get_running_loop().create_task(self._watch(), name=f"{self.name}-live")
        try:
            await self._read_loop(reader)
        finally:
            watch.cancel()

    async def _watch(self) -> None:
        """Ping the worker; kill it once it has sent nothing (no token, no pong) for
        daemon.liveness_timeout: a stopped or hung process would otherwise keep its request
        until the request's own timeout and leave the model "ready". The worker answers
        pings from its decode-stop thread while llama_decode runs, so a long prompt
        evaluation is not taken for a hang."""
        while not self._stopping:
            limit = self.listener.config.daemon.liveness_timeout
            period = ping_period(limit)
            self._send(messages.Ping())
            asked = self._clock()
            await self._sleep(period)
            now = self._clock()
            if now - asked > 2 * period:
                continue  # the daemon's own loop was held up: its reader gets a turn first
            silent = now - self._heard_at
            if silent > limit and not self._stopping and self._proc is not None:
                doing = f"running {', '.join(self.running)}" if self.running else "idle"
                self._hung = (f"killed: no heartbeat for {silent:.1f} s while {doing} "
                              f"(daemon.liveness_timeout {limit:g} s)")
                self.log.error("worker_hung", pid=self.pid, silent_s=round(silent, 1),
                               requests=list(self.running))
                kill(self._proc)  # its stream then ends; _reap says why
                return

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                msg = await self._recv(reader)
            except (ProtocolError, OSError, messages.DecodeError) as exc:
                # DecodeError: a message that breaks its declaration in messages.py.
                self.log.error("worker_stream_broken", error=str(exc))
                return
            if msg is None:
                return
            self._heard_at = self._clock()
            try:
                self._handle(msg)
            except Exception:
                self.log.exception("worker_message_failed", type=type(msg).__name__)

    def _handle(self, msg: messages.FromWorker) -> None:
        if isinstance(msg, messages.Pong):
            return
        if isinstance(msg, messages.Threads):
            self.log.info("threads_applied", threads=msg.n, stage=msg.stage, at=msg.at,
                          redone=msg.redone, requests=list(self.running))
            self.threads = msg.n
            if msg.n == self.threads_asked:
                self.threads_why, self.threads_asked = self._threads_why_asked, None
        elif isinstance(msg, messages.Kv):
            self.n_ctx = msg.n_ctx
            self.listener.worker_kv(self, msg)
        elif isinstance(msg, messages.Batch):
            self.batch.add(msg)
        elif isinstance(msg, messages.PromptCache):
            self.cache.add(msg.stats)
            if msg.asked and msg.freed_entries:
                self.log.info("prompt_cache_shrunk", limit=msg.stats.limit,
                              freed_entries=msg.freed_entries, freed_bytes=msg.freed_bytes,
                              entries=msg.stats.entries, bytes=msg.stats.bytes,
                              disk_entries=msg.stats.disk_entries)
        elif isinstance(msg, messages.Token | messages.Done | messages.Preempted
                        | messages.Error):
            self._handle_request(msg)
        else:  # Ready or LoadFailed after the load
            self.log.warning("worker_stray_message", type=type(msg).__name__)

    def _handle_request(self, msg: messages.Token | messages.Done | messages.Preempted
                        | messages.Error) -> None:
        req = self.running.get(msg.req)
        if req is None:
            self.log.warning("worker_stray_message", type=type(msg).__name__, req=msg.req)
            return
        if isinstance(msg, messages.Token):
            req.token(msg.text, msg.tokens)
            return
        del self.running[msg.req]  # the worker freed the slot before it answered
        self.batch.cells.pop(msg.req, None)
        self.served += not isinstance(msg, messages.Preempted)
        if isinstance(msg, messages.Done):
            self.listener.worker_done(self, req, msg)
        elif isinstance(msg, messages.Preempted):
            self.listener.worker_preempted(self, req, msg.resume)
        else:
            self.listener.worker_error(self, req, msg.code, msg.message, msg.param)
        if self.state == "busy":
            self.state = "busy" if self.running else "idle"
            self.listener.worker_idle(self)  # a slot is free: dispatch fills it

    async def _reap(self) -> str:
        """Wait for the process to end and release its scope; returns how it ended when
        the kernel's OOM killer took it, else ""."""
        oom = self._ended = ""
        proc, self._proc = self._proc, None
        # No more requests for it: one dispatched while the process is reaped would be lost.
        self.state = "stopped" if self._stopping else "restarting"
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if proc is not None:
            kill(proc)
            code = await proc.wait()
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            self._ended = "signal" if code < 0 else "exit"
            if self._hung:
                how, self._ended = self._hung, "hung"
            elif code == -signal.SIGKILL and self.listener.oom_killed(self):
                self._ended = "oom"
                # No figure: a limits change that caused the kill may not have returned yet.
                how = oom = ("killed by the kernel's OOM killer (out of memory: its scope's "
                             "memory.max, shown by llmctl limits, or the machine's memory)")
            self.last_error = f"worker process {proc.pid} {how}"
            if not self._stopping:
                self.log.error("worker_exited", pid=proc.pid, how=how, stderr=self._tail())
            # Every sequence of the process is lost; the queued requests are not.
            lost, self.running = list(self.running.values()), {}
            self.batch.cells.clear()
            for req in lost:
                self.listener.worker_lost(self, req, "worker_hung" if self._hung else
                                          "worker_died", f"worker {self.name} (pid {proc.pid}) {how}")
        if self.scope is not None:
            await self.listener.release(self)
            self.scope = None
        self.pid, self.threads_asked, self._hung = None, None, ""
        self.state = "stopped" if self._stopping else "restarting"
        return oom

    async def _drain_stderr(self, stream: asyncio.StreamReader | None) -> None:
        """Log the worker's stderr a line at a time until it closes. A line longer than the
        reader's limit (64 KiB) comes in pieces: readline() would raise, nobody would read
        the pipe any more, and a worker writing on would block."""
        while stream is not None:
            try:
                line = await stream.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:  # the end, maybe after a last line
                line, stream = exc.partial, None
            except asyncio.LimitOverrunError as exc:
                line = await stream.readexactly(exc.consumed)
            if line:
                text = line.decode(errors="replace").rstrip()
                self.stderr_tail.append(text)
                self.log.debug("worker_stderr", line=text)

    def _tail(self) -> str:
        return " | ".join(self.stderr_tail)[-2000:]

    # -- commands --------------------------------------------------------------

    def _send(self, msg: msgspec.Struct) -> None:
        self._write(messages.frame(msg))

    def _write(self, frame: bytes) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(frame)

    def run(self, req: Request) -> None:
        """Start req in a free slot. If the hand-over fails (the frame cannot be encoded or
        written), it raises with the slot still free. A worker whose connection is gone
        takes req all the same: its death fails or requeues what it runs (supervision)."""
        assert self.free_slots > 0 and req.id not in self.running
        frame = messages.frame(messages.Generate(req=req.id, params=req.params,
                                                 resume=req.resume))
        self._write(frame)
        self.running[req.id] = req
        self.state = "busy"
        req.started_at = req.started_at or time.monotonic()
        req.resume = None  # the worker has it now; it sends a new one if preempted again

    def cancel(self, req: Request) -> None:
        if req.id in self.running:
            self._send(messages.Cancel(req=req.id))

    def preempt(self, req: Request, state_min_tokens: int) -> None:
        """Ask the worker to give up req's slot at the next step; it answers Preempted."""
        if req.id in self.running:
            self._send(messages.Preempt(req=req.id, state_min_tokens=state_min_tokens))

    def kv_op(self, op: str, values: dict[str, Any]) -> None:
        """trim_kv (values may name the sequence: req) or shrink_kv, done at the next step
        (or at once if idle)."""
        self._send(messages.TrimKv(**values) if op == "trim_kv" else messages.ShrinkKv(**values))

    def set_prompt_cache(self, limit: int) -> None:
        """Hold at most `limit` bytes of prompt cache in memory (the rest stays on disk)."""
        self._send(messages.SetPromptCache(limit=limit))

    def set_threads(self, n: int, why: str) -> None:
        """Ask for n threads; the worker stops the decode call in progress and takes them."""
        self.threads_asked, self._threads_why_asked = n, why
        self._send(messages.SetThreads(n=n))

    async def retire(self, grace: float) -> None:
        """Take no new request; stop once the running ones are done (a reload's restart)."""
        self._stopping = True
        while self.running:
            await asyncio.sleep(0.05)
        await self.stop(grace)

    async def stop(self, grace: float) -> None:
        """Ask the worker to exit; kill it after grace seconds."""
        self._stopping = True
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        self._send(messages.Shutdown())
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            kill(proc)
            await proc.wait()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "model": self.model.name, "index": self.index,
            "pid": self.pid, "state": self.state, "threads": self.threads,
            "threads_why": self.threads_why or None, "threads_asked": self.threads_asked,
            "n_ctx": self.n_ctx, "slots": self.slots, "slots_busy": len(self.running),
            **self.process.read(self.pid), "served": self.served, "restarts": self.restarts,
            "deaths": dict(self.deaths),
            "requests": [{"id": r.id, "tokens": r.tokens_sent,
                          "kv_cells": self.batch.cells.get(r.id)} for r in self.running.values()],
            "batch": self.batch.describe(),
            "prompt_cache": self.cache.describe(),
            "last_error": self.last_error or None,
            "load_failures": self.load_failures,
            "retry_in_s": None if (t := self.backoff.retry_in()) is None else round(t, 3),
            "unit": self.scope.name if self.scope else None,
            "scope_error": self.scope_error or None,
        }
