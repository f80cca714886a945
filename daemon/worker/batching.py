"""Continuous batching: which sequences hold which slot, and what the next llama_decode
call evaluates. Pure: no llama, so it is tested with a fake model.

Each step holds the next token of every decoding sequence, then prompt tokens of the
sequences still evaluating theirs, oldest first, up to the batch size. While some
sequence decodes, prompt tokens per step are capped at `chunk`: a long prompt is then
evaluated over several steps (chunked prefill) and the others keep getting a token every
step instead of waiting for the whole prompt. llama-server builds its batches the same
way (update_slots in tools/server/server-context.cpp), without the cap.

A slot keeps the tokens its KV cache holds after its sequence ends; a new sequence takes
the free slot sharing the longest prefix with it and evaluates only the rest (a chat's
next turn, a request resumed after preemption).

A sequence may run with a LoRA adapter (its `adapter` key: None for the base model).
llama.cpp applies adapters to the whole context, so a step holds only sequences with the
same key (llama-server skips a slot whose adapters differ from the batch's in the same
way). A group keeps the steps for `turn` steps while another waits, then the group of the
sequence that has waited longest since its last step goes: no group starves, and the
cost of a switch (llama.cpp reserves its graph again) is paid once a turn, not every
step. A cached prefix is reused only under the key that computed it.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field

MIN_REUSE = 8  # a shorter common prefix (a BOS, a template's first tokens) saves little


@dataclass(eq=False)
class Sequence:
    req: str
    slot: int
    tokens: list[int]  # prompt and generated tokens; position i holds tokens[i]
    done: int = 0  # tokens[:done] are in the KV cache
    order: int = 0  # admission order: older prompts are evaluated first
    adapter: Hashable = None  # sequences with equal keys may share a step
    stepped: int = -1  # the last step that held its tokens
    shifted: bool = False  # a context shift moved its cells: its cache serves no other prompt

    @property
    def pending(self) -> int:
        """Tokens still to evaluate: 1 while decoding (the last sampled token)."""
        return len(self.tokens) - self.done

    @property
    def decoding(self) -> bool:
        return self.pending == 1


@dataclass(frozen=True)
class Piece:
    """A run of one sequence's tokens in a step: tokens[start:start + count] at positions
    start.., with the logits of the last one wanted when the sequence samples next."""

    seq: Sequence
    start: int
    count: int
    logits: bool
    prefill: bool  # part of the prompt (a cancel or preemption need not wait for it)


@dataclass
class Batcher:
    slots: int
    n_batch: int  # most tokens in one step
    chunk: int  # most prompt tokens in one step while another sequence decodes
    turn: int = 1  # steps an adapter group keeps while another group waits
    running: dict[str, Sequence] = field(default_factory=dict)
    cached: list[list[int]] = field(default_factory=list)  # per slot, held by a free slot
    cached_adapter: list[Hashable] = field(default_factory=list)  # the key that computed it
    _order: itertools.count = field(default_factory=itertools.count)
    _turn: int = 0
    _steps: int = 0
    _group: Hashable = None  # the adapter key of the last step
    _group_steps: int = 0  # steps it has had in a row

    def __post_init__(self) -> None:
        if not self.cached:
            self.cached = [[] for _ in range(self.slots)]
        if not self.cached_adapter:
            self.cached_adapter = [None] * self.slots

    @property
    def free(self) -> int:
        return self.slots - len(self.running)

    def pick(self, tokens: list[int], adapter: Hashable = None) -> tuple[int, int]:
        """The free slot for a sequence of these tokens, and how many of them its cache
        holds: the slot sharing the longest prefix with tokens (computed under the same
        adapter), else one beside busy slots (llama.cpp evaluates consecutive sequence ids
        in one ubatch), else the lowest."""
        if not self.free:
            raise ValueError("no free slot")
        busy = {s.slot for s in self.running.values()}
        free = [i for i in range(self.slots) if i not in busy]

        def common(i: int) -> int:
            same = self.cached_adapter[i] == adapter
            return common_prefix(self.cached[i], tokens) if same else 0

        def worth(i: int) -> tuple[int, int, int]:
            n = common(i)
            beside = (i - 1 in busy) + (i + 1 in busy) + (not busy and i == 0)
            return (n if n >= MIN_REUSE else 0, beside, -i)

        slot = max(free, key=worth)
        return slot, common(slot)

    def held(self, slot: int) -> tuple[list[int], Hashable]:
        """What a free slot's cache holds, and the adapter key that computed it."""
        return self.cached[slot], self.cached_adapter[slot]

    def admit(self, req: str, tokens: list[int], adapter: Hashable = None,
              slot: int | None = None) -> Sequence:
        """Give req a free slot (`slot`, else pick's). The KV of that slot from seq.done
        on must be dropped by the caller; the last token is always evaluated again (its
        logits pick the next one)."""
        if req in self.running:
            raise ValueError(f"{req} runs already")
        chosen, common = self.pick(tokens, adapter)
        if slot is not None and slot != chosen:
            cached, key = self.held(slot)
            chosen, common = slot, common_prefix(cached, tokens) if key == adapter else 0
        held = min(common, len(tokens) - 1)
        self.cached[chosen], self.cached_adapter[chosen] = [], None
        seq = Sequence(req, chosen, list(tokens), held, next(self._order), adapter)
        self.running[req] = seq
        return seq

    def release(self, req: str, keep_cache: bool = True) -> Sequence:
        """End req's sequence; its slot keeps the KV it holds unless keep_cache is False
        or a context shift moved it (the caller then drops it)."""
        seq = self.running.pop(req)
        keep_cache = keep_cache and not seq.shifted
        self.cached[seq.slot] = seq.tokens[: seq.done] if keep_cache else []
        self.cached_adapter[seq.slot] = seq.adapter
        return seq

    def cached_tokens(self) -> int:
        return sum(len(c) for c in self.cached)

    def forget_caches(self) -> list[int]:
        """Free slots drop what their cache holds; returns those slots (to clear)."""
        slots = [i for i, c in enumerate(self.cached) if c]
        self.cached = [[] for _ in range(self.slots)]
        return slots

    def plan(self) -> list[Piece]:
        """The next step: every decoding sequence's token, then prompt chunks, of one
        adapter group."""
        by_age = sorted(self.running.values(), key=lambda s: s.order)
        if by_age:
            group = self._next_group(by_age)
            by_age = [s for s in by_age if s.adapter == group]
        decoding = [s for s in by_age if s.decoding]
        if len(decoding) > self.n_batch:  # a batch smaller than the slots: take turns
            self._turn = (self._turn + 1) % len(decoding)
            decoding = (decoding[self._turn:] + decoding[: self._turn])[: self.n_batch]
        pieces = [Piece(s, s.done, 1, True, False) for s in decoding]
        budget = self.n_batch - len(pieces)
        if decoding:
            budget = min(budget, self.chunk)
        for seq in by_age:
            if budget <= 0:
                break
            if seq.pending > 1:
                count = min(seq.pending, budget)
                pieces.append(Piece(seq, seq.done, count, seq.done + count == len(seq.tokens), True))
                budget -= count
        return pieces

    def _next_group(self, by_age: list[Sequence]) -> Hashable:
        """The adapter key of the next step: the last step's until its turn is up while
        another group waits, then that of the sequence that has waited longest."""
        others = [s for s in by_age if s.adapter != self._group]
        if not others:
            return self._group
        if self._group_steps < self.turn and len(others) < len(by_age):
            return self._group
        return min(others, key=lambda s: (s.stepped, s.order)).adapter

    def advance(self, pieces: list[Piece]) -> None:
        """The step was evaluated: its tokens are in the cache."""
        for p in pieces:
            p.seq.done = max(p.seq.done, p.start + p.count)
            p.seq.stepped = self._steps
        self._steps += 1
        group = pieces[0].seq.adapter if pieces else self._group
        self._group_steps = self._group_steps + 1 if group == self._group else 1
        self._group = group


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two lists share from the start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
