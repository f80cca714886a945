"""The worker process: owns one llama_cpp.Llama and serves generate commands one at a time.

Run by the daemon as `python -m llm_residentd.worker --fd N`. Fd N is a socketpair end
speaking the framed msgpack of protocol.py. Control messages (cancel, set_threads,
preempt, KV operations, shutdown) are read between tokens, and during a request also by
a watcher thread (decodestop.py) that stops the llama_decode call in progress for a
cancel, a thread change or shutdown, so none of them waits for a slow token or a prompt
chunk. The daemon's liveness pings are answered at once wherever they are read: by the
main loop while idle, by that thread during a long prompt evaluation.
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
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from . import grammars, kvstate
from .cpus import usable_cpus
from .decodestop import DecodeStop
from .protocol import recv_frame, send_frame
from .stopstrings import StopScanner

IPC_MAX_FRAME = 64 << 20
STATE_MAX = IPC_MAX_FRAME - (1 << 20)  # a larger saved state is recomputed instead
KV_OPS = ("trim_kv", "shrink_kv")


class Cancelled(Exception):
    """A stop asked for mid-request; stage is "prefill" or "decode"."""

    def __init__(self, stage: str, tokens: int) -> None:
        super().__init__(stage)
        self.stage = stage
        self.tokens = tokens


class Preempted(Exception):
    """The request gave up its worker; resume says how to continue it elsewhere."""

    def __init__(self, resume: dict[str, Any]) -> None:
        super().__init__("preempted")
        self.resume = resume


@dataclass
class Run:
    """One request's progress, kept across segments (a trim or shrink starts a new one)."""

    req: str
    context: list[int]  # prompt and generated tokens; the KV holds all but the last
    prompt_tokens: int
    generated: int
    max_tokens: int
    output: list[int] = field(default_factory=list)  # the generated tokens, never trimmed
    grammar: Any = None  # a llama_cpp.LlamaGrammar the output must match
    finish: str | None = None
    first_at: float | None = None
    started: float = field(default_factory=time.monotonic)


class Channel:
    """The socket to the daemon, with control messages that arrive mid-generation."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.cancelled: set[str] = set()
        self.threads_wanted: int | None = None
        self.preempts: dict[str, int] = {}  # request -> save the state from this many tokens
        self.kv_ops: list[dict[str, Any]] = []
        self.shutdown = False
        self._pending: list[dict[str, Any]] = []
        self.lock = threading.RLock()  # poll() runs on the main thread and the DecodeStop's
        self._send_lock = threading.Lock()  # so does send(): a pong beside the tokens

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: dict[str, Any]) -> None:
        with self._send_lock:
            send_frame(self.sock, msg)

    def recv(self) -> dict[str, Any] | None:
        """Next command: held-back ones first, then a blocking read."""
        if self._pending:
            return self._pending.pop(0)
        return recv_frame(self.sock, IPC_MAX_FRAME)

    def poll(self) -> None:
        """Take in every control message that is waiting, without blocking."""
        with self.lock:
            while select.select([self.sock], [], [], 0)[0]:
                msg = recv_frame(self.sock, IPC_MAX_FRAME)
                if msg is None:
                    self.shutdown = True
                    return
                kind = msg.get("type")
                if kind == "cancel":
                    self.cancelled.add(msg["req"])
                elif kind == "set_threads":
                    self.threads_wanted = int(msg["n"])
                elif kind == "preempt":
                    self.preempts[msg["req"]] = int(msg["state_min_tokens"])
                elif kind in KV_OPS:
                    self.kv_ops.append(msg)
                elif kind == "shutdown":
                    self.shutdown = True
                elif kind == "ping":
                    self.send({"type": "pong"})
                else:
                    self._pending.append(msg)

    def forget(self) -> None:
        """Before a new request: drop stops of earlier ones that came too late."""
        self.cancelled.clear()
        self.preempts.clear()


class Outbox:
    """Token text for the daemon, one frame per interval; the first token goes at once.

    Fewer frames leave more CPU to the model when its threads fill every core. Token bytes
    become text here (a character may span tokens), and text that could be the start of
    a stop string is held back until it is known not to be one.
    """

    def __init__(self, ch: Channel, req: str, interval: float, stops: list[str],
                 resume: dict[str, Any]) -> None:
        self.ch, self.req, self.interval = ch, req, interval
        self.text, self.tokens, self.sent_at = "", 0, -interval
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.decoder.setstate((resume.get("pending", b""), 0))
        self.stops = StopScanner(stops, resume.get("held", ""))

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

    def suspend(self) -> dict[str, Any]:
        """What is not sent yet, for the resume of a preempted request."""
        self.flush()
        return {"pending": self.decoder.getstate()[0], "held": self.stops.held}

    def flush(self) -> None:
        if self.text:
            self.ch.send({"type": "token", "req": self.req, "text": self.text,
                          "tokens": self.tokens})
            self.text, self.tokens, self.sent_at = "", 0, time.monotonic()


class Engine:
    """One model in this process, generating with its own token loop."""

    def __init__(self, cfg: dict[str, Any], channel: Channel) -> None:
        import llama_cpp  # imported here so --help stays fast
        import numpy

        self.llama_cpp, self.np = llama_cpp, numpy
        self.cfg = cfg
        self.channel = channel
        if cfg["threads"]:
            self.threads, self.threads_why = cfg["threads"], f"config: threads = {cfg['threads']}"
        else:
            self.threads, self.threads_why = usable_cpus()
        self.seed = cfg["seed"]
        self.stream_interval = cfg["stream_interval"]
        self._req: str | None = None  # the request being generated, and where it is
        self._stage = "idle"
        self.stop = DecodeStop(channel, self._must_stop_or_rethread)
        self._open(cfg["n_ctx"])
        self.formatter = self._chat_formatter() if cfg["chat_template"] else None
        # token -> llm.detokenize([token]); at most one entry per vocabulary token
        self._pieces: dict[int, bytes] = {}

    def _open(self, n_ctx: int) -> None:
        cfg = self.cfg
        self.llm = self.llama_cpp.Llama(
            model_path=cfg["path"], n_ctx=n_ctx, n_batch=cfg["n_batch"],
            n_threads=self.threads, n_threads_batch=self.threads, verbose=False,
            # llama-server turns flash attention on for the CPU (-fa auto), llama-cpp-python
            # leaves it off. On: decode +7 %, TTFT -15 ms (SmolLM2-135M, 2 threads, measured
            # beside llama-server); the text then matches llama-server's, greedy included,
            # and differs from llama-cpp-python's default.
            flash_attn=bool(cfg.get("flash_attn", False)),
            seed=self.seed if self.seed >= 0 else self.llama_cpp.LLAMA_DEFAULT_SEED)
        # llama.cpp may round the context up; llama-cpp-python's buffers keep the asked size.
        self.n_ctx = min(self.llm.n_ctx(), n_ctx)
        self.stop.install(self.llama_cpp, self.llm.ctx)

    def _chat_formatter(self) -> Any:
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        model = self.llm._model
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "")

    def tokens(self, msg: dict[str, Any]) -> list[int]:
        """The request's prompt tokens: its prompt as a user message, or its messages, in
        the model's chat template; a raw prompt (or any, without a template) as is."""
        messages = msg.get("messages")
        if messages is None and (self.formatter is None or msg.get("raw")):
            return self.llm.tokenize(msg["prompt"].encode(), add_bos=True, special=False)
        if self.formatter is None:
            raise ValueError("messages need a chat template, and this model has none (no "
                             "tokenizer.chat_template in its GGUF, or its config sets "
                             "chat_template = false): send a prompt instead")
        messages = messages or [{"role": "user", "content": msg["prompt"]}]
        prefill = ""
        if messages[-1]["role"] == "assistant":  # the answer continues this text
            messages, prefill = messages[:-1], messages[-1]["content"]
        from jinja2 import TemplateError

        try:
            result = self.formatter(messages=messages)
        except TemplateError as exc:
            raise ValueError(f"the model's chat template failed on these messages: "
                             f"{type(exc).__name__}: {exc}") from None
        return self.llm.tokenize((result.prompt + prefill).encode(),
                                 add_bos=not result.added_special, special=True)

    def set_threads(self, n: int) -> None:
        n = max(1, n)
        self.llama_cpp.llama_set_n_threads(self.llm.ctx, n, n)
        self.threads = n

    def take_threads(self, stage: str = "idle", at: int = 0, redone: bool = False) -> None:
        """Apply a thread count the daemon asked for, for decoding and prompt evaluation
        alike; called only between llama_decode calls, never inside one. The answer says
        where: idle, or in a request's prefill or decode after `at` tokens, and whether
        the call in progress was stopped to take it and made again (redone)."""
        n, self.channel.threads_wanted = self.channel.threads_wanted, None
        if n is not None:
            self.set_threads(n)
            self.channel.send({"type": "threads", "n": self.threads, "stage": stage, "at": at,
                               "redone": redone})

    def _must_stop(self) -> bool:
        """A cancel or shutdown ends the running llama_decode call for good; so does a
        preemption during prompt evaluation (while decoding it waits for the token, so
        that the KV state can be saved)."""
        ch, req = self.channel, self._req
        return req is not None and (req in ch.cancelled or ch.shutdown
                                    or (self._stage == "prefill" and req in ch.preempts))

    def _must_stop_or_rethread(self) -> bool:
        return self.channel.threads_wanted is not None or self._must_stop()

    def _eval(self, tokens: list[int], stage: str, at: int) -> None:
        """llm.eval(tokens) with the thread count asked for; a call stopped for a thread
        change is made again with it, one stopped for good raises RuntimeError (as
        llama-cpp-python does for llama_decode's "aborted")."""
        self._stage = stage
        redone = False
        while True:
            self.stop.clear()
            if self._must_stop():  # asked for since the last call
                raise RuntimeError("stopped between two llama_decode calls")
            self.take_threads(stage, at, redone)
            try:
                self.llm.eval(tokens)
                return
            except RuntimeError:
                if not self.stop.fired or self._must_stop():
                    raise
                redone = True

    # -- one request ----------------------------------------------------------------

    def _start(self, msg: dict[str, Any]) -> Run:
        """A new request, or one resumed after preemption (with its saved state if any)."""
        resume = msg.get("resume")
        grammar = grammars.from_request(self.llama_cpp, self.llm._model.vocab, msg)
        if resume:
            context = list(resume["context"])
            run = Run(msg["req"], context, resume["prompt_tokens"], resume["generated"],
                      msg["max_tokens"], list(resume["output"]), grammar)
            self._make_room(len(context) + msg["max_tokens"] - resume["generated"])
            if len(context) >= self.n_ctx:
                raise ValueError(f"too_long: the preempted request holds {len(context)} tokens;"
                                 f" this worker's context holds {self.n_ctx}")
            state = resume.get("state")
            if state and not kvstate.restore(self.llm, state, context[:-1]):
                kvstate.clear(self.llm)  # the prefix is recomputed instead
            return run
        prompt = self.tokens(msg)
        self._make_room(len(prompt) + msg["max_tokens"])
        if len(prompt) >= self.n_ctx:
            raise ValueError(f"too_long: the prompt is {len(prompt)} tokens; the context "
                             f"holds {self.n_ctx} and needs room for at least one more")
        return Run(msg["req"], prompt, len(prompt), 0,
                   min(msg["max_tokens"], self.n_ctx - len(prompt)), grammar=grammar)

    def _make_room(self, tokens: int) -> None:
        """A context shrunk under memory pressure grows back for a request that needs it."""
        full = self.cfg["n_ctx"]
        if self.n_ctx < full and tokens > self.n_ctx:
            report = self.kv_op({"type": "shrink_kv", "n_ctx": full})
            self.channel.send({**report, "op": "grow_kv", "asked": False})

    def generate(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Stream tokens of one request to the daemon; return its stats."""
        run = self._start(msg)
        # Seed every request: the request's, else the worker's, else a fresh one.
        seed = next((x for x in (msg.get("seed", -1), self.seed) if x >= 0), None)
        self.llm.set_seed(seed if seed is not None else random.randrange(2**31))
        out = Outbox(self.channel, run.req, self.stream_interval, msg.get("stop", []),
                     msg.get("resume") or {})
        sampling = {"top_k": msg.get("top_k", 40), "top_p": msg.get("top_p", 0.95),
                    "min_p": msg.get("min_p", 0.05), "temp": msg.get("temperature", 0.8),
                    "repeat_penalty": msg.get("repeat_penalty", 1.0)}
        self._req = run.req
        try:
            with self.stop.armed():
                while run.finish is None:
                    op = self._segment(run, sampling, out, msg.get("ignore_eos", False))
                    if op is not None:
                        self.channel.send(self.kv_op(op, run))
        finally:
            self._req, self._stage = None, "idle"
        if out.finish():  # a stop string that the last bytes completed
            run.finish = "stop"
        done = time.monotonic()
        decode_s = done - run.first_at if run.first_at else 0.0
        new = run.generated - (msg.get("resume") or {}).get("generated", 0)
        return {
            "prompt_tokens": run.prompt_tokens, "completion_tokens": run.generated,
            "finish_reason": run.finish,
            "prefill_s": (run.first_at or done) - run.started,
            "tokens_per_s": (new - 1) / decode_s if new > 1 and decode_s > 0 else None,
        }

    def _segment(self, run: Run, sampling: dict[str, Any], out: Outbox,
                 ignore_eos: bool) -> dict[str, Any] | None:
        """Generate until the request ends (sets run.finish) or a KV operation is asked
        for at a token boundary (returned). Raises Cancelled or Preempted."""
        ch, req, vocab = self.channel, run.req, self.llm._model.vocab
        tokens = self._tokens(run, sampling)
        evaluating = True
        try:
            self._prefill(run.context)
            for token in tokens:
                if evaluating:
                    evaluating = False
                    run.first_at = run.first_at or time.monotonic()
                if self.llama_cpp.llama_vocab_is_eog(vocab, token) and not ignore_eos:
                    run.finish = "stop"
                    return None
                run.generated += 1
                run.context.append(token)
                run.output.append(token)
                piece = self._pieces.get(token)
                if piece is None:
                    piece = self._pieces[token] = self.llm.detokenize([token])
                if out.add(piece):
                    run.finish = "stop"  # a stop string
                    return None
                if run.generated >= run.max_tokens or len(run.context) >= self.n_ctx:
                    run.finish = "length"
                    return None
                ch.poll()  # a thread change is taken by the next _eval
                if req in ch.cancelled or ch.shutdown:
                    raise Cancelled("decode", run.generated)
                if req in ch.preempts:
                    raise Preempted(self._suspend(run, out, ch.preempts[req]))
                if ch.kv_ops:
                    out.flush()
                    return ch.kv_ops.pop(0)
        except RuntimeError:
            if not self._must_stop():  # llama_decode failed: not a stop
                raise
            self.llm.reset()  # the aborted decode left the context half-evaluated
            if req in ch.preempts:
                raise Preempted(self._suspend(run, out, None)) from None
            raise Cancelled("prefill" if evaluating else "decode", run.generated) from None
        finally:
            tokens.close()
        run.finish = "stop"  # the generator ended by itself
        return None

    def _tokens(self, run: Run, sampling: dict[str, Any]) -> Generator[int, None, None]:
        """The tokens llm.generate(context, **sampling) yields once _prefill has evaluated
        context but its last token: evaluate that one, sample, evaluate the sample, ...

        Greedy requests (temperature 0, repeat_penalty 1, so llama.cpp's penalties do
        nothing) take the argmax of the logits: the token llama.cpp's greedy sampler picks
        (the first highest logit), without the sampler's copy of the whole vocabulary
        (590 KB for 49k tokens) per token, nor generate()'s bookkeeping. Measured with
        SmolLM2-135M, 2 threads: 190 -> 126 us between two llama_decode calls (this and
        the piece cache), decode tokens/s +2 to +3 % in alternating runs, the same text.

        A grammar is a sampler of the chain (before top-k and the rest), or for greedy
        requests a GreedyPicker; each segment makes a new one (a shrink reopens the model
        it points into), brought to where the output is by accepting the tokens
        generated so far."""
        llm, np, lib = self.llm, self.np, self.llama_cpp
        greedy = sampling["temp"] == 0.0 and sampling["repeat_penalty"] == 1.0
        n_vocab = llm.n_vocab()
        sampler, picker = None, None
        if run.grammar is not None and greedy:
            picker = grammars.GreedyPicker(lib, np, llm._model.vocab, run.grammar, n_vocab,
                                           run.output)
        elif run.grammar is not None:
            sampler = llm._init_sampler(**sampling, grammar=run.grammar)
            for token in run.output:
                sampler.accept(token)
        elif not greedy:
            sampler = llm._init_sampler(**sampling)
        token, done = run.context[-1], run.generated  # done: where a thread change is taken
        try:
            while True:
                self._eval([token], "decode", done)
                done += 1
                if sampler is None:
                    logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1),
                                                   shape=(n_vocab,))
                    token = picker.pick(logits) if picker else int(logits.argmax())
                else:
                    token = sampler.sample(llm._ctx, -1)
                yield token
        finally:
            if picker is not None:
                picker.close()

    def _prefill(self, context: list[int]) -> None:
        """Evaluate all but the last token of context, n_batch tokens per llama_decode
        (each through _eval, which takes thread changes); _tokens() then evaluates the last
        token itself. The cached prefix is kept, as llm.generate() would."""
        llm, upto = self.llm, len(context) - 1
        self.channel.poll()
        held = 0
        if not (llm._is_recurrent or llm._is_hybrid):  # their cache cannot be cut short
            for a, b in zip(llm.input_ids[: llm.n_tokens], context[:upto], strict=False):
                if a != b:
                    break
                held += 1
        if held < llm.n_tokens:
            llm.n_tokens = held  # eval() drops the cache from here
        if held == 0:
            llm.reset()
        for start in range(held, upto, self.cfg["n_batch"]):
            self._eval(context[start:min(upto, start + self.cfg["n_batch"])], "prefill", start)

    def _suspend(self, run: Run, out: Outbox, state_min_tokens: int | None) -> dict[str, Any]:
        """What another worker needs to continue run: its tokens and, for a long context,
        the saved KV (short ones are cheaper to recompute)."""
        held = len(run.context) - 1
        state = None
        if state_min_tokens is not None and held >= state_min_tokens:
            state = kvstate.save(self.llm, STATE_MAX)
        return {"context": run.context, "prompt_tokens": run.prompt_tokens,
                "generated": run.generated, "output": run.output, "state": state,
                **out.suspend()}

    # -- KV operations -------------------------------------------------------------

    def kv_op(self, op: dict[str, Any], run: Run | None = None) -> dict[str, Any]:
        """Trim the cache (trim_kv) or reopen with a smaller context (shrink_kv), in the
        middle of a request (run) or between requests; returns the report for the daemon."""
        t0, rss0 = time.monotonic(), _rss()
        held = run.context[:-1] if run else list(self.llm.input_ids[: self.llm.n_tokens])
        before = len(held)
        act = self._trim if op["type"] == "trim_kv" else self._shrink
        result = act(held, op, run)
        return {"type": "kv", "op": op["type"], "result": result, "tokens_before": before,
                "tokens_after": self.llm.n_tokens, "n_ctx": self.n_ctx,
                "rss_before": rss0, "rss_after": _rss(),
                "ms": round((time.monotonic() - t0) * 1000, 3)}

    def _trim(self, held: list[int], op: dict[str, Any], run: Run | None) -> str:
        """Keep the first `keep` and last `tail` cached tokens if `min_prune` can go."""
        if run is None:
            return f"cleared {kvstate.clear(self.llm)} cached tokens (idle)"
        keep, tail, min_prune = op.get("keep", 64), op.get("tail", 256), op.get("min_prune", 64)
        drop = len(held) - keep - tail
        if drop < max(1, min_prune):
            return f"skipped: {len(held)} tokens, keep {keep} + tail {tail} free under {min_prune}"
        kept = kvstate.trim(self.llm, held, keep, drop)
        if kept is None:
            return "unsupported: this model's cache cannot shift positions"
        run.context = kept + run.context[-1:]
        return f"trimmed {drop} tokens"

    def _shrink(self, held: list[int], op: dict[str, Any], run: Run | None) -> str:
        n_ctx = int(op["n_ctx"])
        if n_ctx == self.n_ctx:
            return f"unchanged: n_ctx is {n_ctx}"
        if run is not None and len(run.context) + 1 > n_ctx:
            why = self._trim(held, {**op, "min_prune": 0}, run)
            held = run.context[:-1]
            if len(run.context) + 1 > n_ctx:
                return f"refused: {len(held)} tokens do not fit n_ctx {n_ctx} ({why})"
        state = kvstate.save(self.llm, 1 << 62) if run is not None and held else None
        old = self.n_ctx
        self.llm.close()
        self._open(n_ctx)
        self.set_threads(self.threads)
        if state is not None and not kvstate.restore(self.llm, state, held):
            kvstate.clear(self.llm)  # the next segment recomputes the context
        return f"n_ctx {old} -> {self.n_ctx}"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def serve(ch: Channel, engine: Engine) -> None:
    while not ch.shutdown:
        msg = ch.recv()
        if msg is None:
            return
        kind = msg.get("type")
        if kind == "generate":
            req = msg["req"]
            ch.forget()
            try:
                stats = engine.generate(msg)
                ch.send({"type": "done", "req": req, "stats": stats})
            except Cancelled as stop:
                ch.send({"type": "done", "req": req, "stats": None, "cancelled": True,
                         "stage": stop.stage, "completion_tokens": stop.tokens})
            except Preempted as p:
                ch.send({"type": "preempted", "req": req, "resume": p.resume})
            except ValueError as exc:
                code, _, text = str(exc).partition(": ")
                if code != "too_long":
                    code, text = "bad_request", str(exc)
                ch.send({"type": "error", "req": req, "code": code, "message": text})
            except Exception as exc:  # report, then keep serving
                ch.send({"type": "error", "req": req, "code": "internal",
                         "message": f"{type(exc).__name__}: {exc}"})
        elif kind == "set_threads":
            ch.threads_wanted = int(msg["n"])
            engine.take_threads()
        elif kind in KV_OPS:
            ch.send(engine.kv_op(msg))
        elif kind == "ping":
            ch.send({"type": "pong"})
        elif kind == "shutdown":
            return
        while ch.kv_ops:  # asked for while the request was ending
            ch.send(engine.kv_op(ch.kv_ops.pop(0)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-residentd-worker",
                                     description="llm-residentd model worker (started by the daemon)")
    parser.add_argument("--fd", type=int, required=True, help="socketpair fd to the daemon")
    parser.add_argument("--name", default="worker", help="worker name, for process listings")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when workers stop
    ch = Channel(socket.socket(fileno=args.fd))
    cfg = ch.recv()
    if cfg is None or cfg.get("type") != "load":
        return 2
    try:  # e.g. a file that daemon.worker_user may not read
        open(cfg["path"], "rb").close()
    except PermissionError:
        ch.send({"type": "load_failed", "message": f"cannot read {cfg['path']} as uid "
                 f"{os.getuid()}: the workers' user (daemon.worker_user) must be able to read it"})
        return 1
    except OSError:
        pass  # the load below reports it
    t0 = time.monotonic()
    try:
        engine = Engine(cfg, ch)
    except Exception as exc:
        ch.send({"type": "load_failed", "message": f"cannot load {cfg['path']}: {exc}"})
        return 1
    ch.send({"type": "ready", "pid": os.getpid(), "threads": engine.threads,
             "threads_why": engine.threads_why,
             "n_ctx": engine.n_ctx, "load_s": time.monotonic() - t0,
             "chat_template": engine.formatter is not None})
    serve(ch, engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
