"""How one sequence picks its next token from the logits of its row in a step.

Greedy requests (temperature 0, repeat_penalty 1, so llama.cpp's penalties do nothing)
take the argmax: the token llama.cpp's greedy sampler picks (the first highest logit),
without the sampler's copy of the whole vocabulary per token (590 KB for 49k tokens).
Measured with SmolLM2-135M, 2 threads: decode tokens/s +2 to +3 %, the same text. A
grammar is a sampler of the chain (before top-k and the rest), or for greedy requests a
GreedyPicker. Other requests get llama-cpp-python's chain (Llama._init_sampler's order:
penalties, grammar, top-k, typical, top-p, min-p, temperature, dist) seeded per request.
"""

from __future__ import annotations

from typing import Any

from . import grammars

PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size


class Picker:
    def __init__(self, lib: Any, np: Any, model: Any, sampling: dict[str, Any], seed: int,
                 grammar: Any, history: list[int]) -> None:
        """sampling: top_k, top_p, min_p, temp, repeat_penalty; history: the tokens
        generated so far (a resumed request), which bring grammar and penalties along."""
        from llama_cpp._internals import LlamaSampler

        self.lib, self.np = lib, np
        self.n_vocab = model.n_vocab()
        self.chain, self.greedy = None, None
        greedy = sampling["temp"] == 0.0 and sampling["repeat_penalty"] == 1.0
        if greedy and grammar is not None:
            self.greedy = grammars.GreedyPicker(lib, np, model.vocab, grammar, self.n_vocab,
                                                history)
        elif not greedy:
            chain = self.chain = LlamaSampler()
            chain.add_penalties(n_vocab=self.n_vocab, penalty_last_n=PENALTY_LAST_N,
                                penalty_repeat=sampling["repeat_penalty"], penalty_freq=0.0,
                                penalty_present=0.0)
            if grammar is not None:
                chain.add_grammar(model, grammar)
            if sampling["temp"] == 0.0:
                chain.add_greedy()
            else:
                chain.add_top_k(sampling["top_k"])
                chain.add_typical(1.0, 1)
                chain.add_top_p(sampling["top_p"], 1)
                chain.add_min_p(sampling["min_p"], 1)
                chain.add_temp(sampling["temp"])
                chain.add_dist(seed)
            for token in history:
                chain.accept(token)

    def pick(self, ctx: Any, index: int) -> int:
        """The next token from the logits of the step's output row `index`."""
        if self.chain is not None:
            return self.lib.llama_sampler_sample(self.chain.sampler, ctx, index)
        logits = self.np.ctypeslib.as_array(self.lib.llama_get_logits_ith(ctx, index),
                                            shape=(self.n_vocab,))
        return self.greedy.pick(logits) if self.greedy else int(logits.argmax())

    def close(self) -> None:
        if self.greedy is not None:
            self.greedy.close()
        if self.chain is not None:
            self.chain.close()
