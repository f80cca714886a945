"""A request's output constraint, in the worker: a JSON Schema or a GBNF grammar made into
a llama_cpp.LlamaGrammar, checked before generation starts.

LlamaGrammar.from_string checks nothing, and a chain given a grammar that llama.cpp
cannot parse gets a NULL sampler and crashes the worker; so the grammar is parsed once
here, and what llama.cpp says about it becomes the request's bad_request. llama.cpp
writes the parse error itself to stderr (fprintf) and a summary to its log (as an error,
caught through llamalog: the worker's log callback stays in place), so both are read
while it parses.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from . import llamalog
from .refusals import Refused

ROOT = "root"


def from_request(llama_cpp: Any, vocab: Any, msg: dict[str, Any]) -> Any:
    """The LlamaGrammar of msg's json_schema or grammar, or None if it has neither.
    Raises Refused naming the problem (the worker's bad_request)."""
    schema, text = msg.get("json_schema"), msg.get("grammar")
    if schema is None and text is None:
        return None
    from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

    field = "grammar"
    if schema is not None:
        field = "json_schema"
        try:
            text = json_schema_to_gbnf(json.dumps(schema))
        except Exception as exc:  # the converter asserts; what it says names the problem
            raise Refused(field, f"json_schema: llama.cpp's converter cannot express it: "
                          f"{exc or type(exc).__name__}") from None
    why = check(llama_cpp, vocab, text)
    if why:
        raise Refused(field, f"{field}: llama.cpp cannot use it: {why}")
    return LlamaGrammar.from_string(text)


def check(llama_cpp: Any, vocab: Any, text: str) -> str:
    """Why llama.cpp refuses the GBNF text, or "" if it takes it."""
    with llamalog.errors() as logged, _stderr() as printed:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), ROOT.encode())
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
        return ""
    detail = re.findall(r"error parsing grammar: (.*)", "".join(printed))
    lines = [*detail, *(line.strip() for line in logged if line.strip())]
    return "; ".join(dict.fromkeys(lines)) or "it does not parse"


@contextlib.contextmanager
def _stderr() -> Iterator[list[str]]:
    """What is written to fd 2 meanwhile (C code's fprintf included)."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


class GreedyPicker:
    """Greedy sampling inside a grammar without checking the whole vocabulary each token.

    The grammar sampler in a chain checks every candidate (49k for SmolLM2) per token,
    which halved decoding speed here. Greedy needs only the highest logit's token: it is
    checked alone, and only when the grammar refuses it is the grammar applied to every
    token and the highest remaining one taken (as llama.cpp's common sampler does). The
    choice is the chain's: the first highest logit among the tokens the grammar allows.
    """

    def __init__(self, llama_cpp: Any, np: Any, vocab: Any, grammar: Any, n_vocab: int,
                 accepted: list[int]) -> None:
        """accepted: the tokens generated so far, which bring the grammar to its place."""
        self.lib, self.np = llama_cpp, np
        self.sampler = llama_cpp.llama_sampler_init_grammar(
            vocab, grammar._grammar.encode(), grammar._root.encode())
        if not self.sampler:
            raise ValueError("grammar: llama.cpp cannot use it")  # checked at start already
        for token in accepted:
            llama_cpp.llama_sampler_accept(self.sampler, token)
        self.one = (llama_cpp.llama_token_data * 1)()
        self.one_view = llama_cpp.llama_token_data_array(self.one, 1, -1, False)
        # every token, in llama_token_data's layout (int32 id, float logit, float p)
        self.all = np.zeros(n_vocab, np.dtype([("id", np.int32), ("logit", np.float32),
                                               ("p", np.float32)]))
        self.all["id"] = np.arange(n_vocab, dtype=np.int32)
        self.all_view = llama_cpp.llama_token_data_array(
            self.all.ctypes.data_as(llama_cpp.llama_token_data_p), n_vocab, -1, False)

    def pick(self, logits: Any) -> int:
        lib = self.lib
        token = int(logits.argmax())
        self.one[0].id, self.one[0].logit = token, float(logits[token])
        self.one_view.size, self.one_view.selected = 1, -1
        lib.llama_sampler_apply(self.sampler, ctypes.byref(self.one_view))
        if self.one[0].logit == float("-inf"):  # refused: the best the grammar allows
            self.all["logit"] = logits
            self.all_view.size, self.all_view.selected = len(self.all), -1
            lib.llama_sampler_apply(self.sampler, ctypes.byref(self.all_view))
            token = int(self.all["logit"].argmax())
        lib.llama_sampler_accept(self.sampler, token)
        return token

    def close(self) -> None:
        if self.sampler:
            self.lib.llama_sampler_free(self.sampler)
            self.sampler = None
