"""The batching scheduler (daemon/worker/batching.py) driven with a fake model: no llama.

FakeModel keeps a KV cache per slot as the list of tokens written at each position and
checks what a real context would refuse (a gap or overlap in positions, a step over the
batch size). Its next token is a function of the sequence's whole context, so a sequence
that ran beside others must produce what it produces alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable

import pytest
from llm_residentd.worker.batching import Batcher, Piece

VOCAB = 97


class FakeModel:
    """Its cache holds, per position, the token and the adapter that computed it: a
    continuation depends on both, as a real KV cache computed under a LoRA adapter does.
    Like llama.cpp it applies one adapter setting to a whole step."""

    def __init__(self, slots: int, n_batch: int) -> None:
        self.kv: list[list[int]] = [[] for _ in range(slots)]
        self.kv_adapter: list[list[Hashable]] = [[] for _ in range(slots)]
        self.n_batch = n_batch
        self.steps: list[list[Piece]] = []

    def drop(self, slot: int, start: int = 0) -> None:
        del self.kv[slot][start:]
        del self.kv_adapter[slot][start:]

    def decode(self, pieces: list[Piece]) -> dict[str, int]:
        """Evaluate a step; returns the next token of each piece whose logits are wanted."""
        assert 0 < sum(p.count for p in pieces) <= self.n_batch
        assert len({p.seq.req for p in pieces}) == len(pieces), "a sequence twice in a step"
        adapters = {p.seq.adapter for p in pieces}
        assert len(adapters) == 1, f"one step, several adapter settings: {adapters}"
        self.steps.append(pieces)
        out = {}
        for p in pieces:
            kv = self.kv[p.seq.slot]
            assert p.start == len(kv), f"{p.seq.req}: writes at {p.start}, cache holds {len(kv)}"
            kv.extend(p.seq.tokens[p.start:p.start + p.count])
            self.kv_adapter[p.seq.slot].extend([p.seq.adapter] * p.count)
            if p.logits:
                assert p.start + p.count == len(p.seq.tokens), "logits before the end"
                keys = [len(str(a)) if a else 0 for a in self.kv_adapter[p.seq.slot]]
                out[p.seq.req] = sum((i + 1) * (t + 3 * k) for i, (t, k)
                                     in enumerate(zip(kv, keys, strict=True))) % VOCAB
        return out


def run(batcher: Batcher, model: FakeModel, prompts: dict[str, list[int]], n_new: int,
        arrive_at: dict[str, int] | None = None, adapters: dict[str, Hashable] | None = None,
        ) -> dict[str, list[int]]:
    """Admit each prompt at its step (arrive_at, default 0), generate n_new tokens each,
    each under its adapter key (default None: the base model)."""
    arrive_at, adapters = arrive_at or {}, adapters or {}
    outputs: dict[str, list[int]] = {}
    waiting = dict(prompts)
    step = 0
    while waiting or batcher.running:
        for req in [r for r in waiting if arrive_at.get(r, 0) <= step and batcher.free]:
            seq = batcher.admit(req, waiting.pop(req), adapters.get(req))
            model.drop(seq.slot, seq.done)
            outputs[req] = []
        pieces = batcher.plan()
        if pieces:
            tokens = model.decode(pieces)
            batcher.advance(pieces)
            for req, token in tokens.items():
                batcher.running[req].tokens.append(token)
                outputs[req].append(token)
                if len(outputs[req]) == n_new:
                    batcher.release(req)
        step += 1
    return outputs


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 31 + i * 7) % VOCAB for i in range(n)]


def test_each_sequence_generates_what_it_generates_alone() -> None:
    prompts = {f"r{i}": prompt(i, 5 + 9 * i) for i in range(4)}
    alone = {r: run(Batcher(1, 64, 16), FakeModel(1, 64), {r: p}, 20)[r]
             for r, p in prompts.items()}
    model = FakeModel(4, 64)
    together = run(Batcher(4, 64, 16), model, prompts, 20, {"r2": 3, "r3": 7})
    assert together == alone
    assert max(len(s) for s in model.steps) == 4  # they did share steps


def test_a_long_prompt_is_chunked_while_others_decode() -> None:
    batcher, model = Batcher(2, 64, 8), FakeModel(2, 64)
    run(batcher, model, {"short": prompt(1, 3), "long": prompt(2, 100)}, 30, {"long": 2})
    mixed = [s for s in model.steps if {p.seq.req for p in s} == {"short", "long"}]
    long_chunks = [p.count for s in mixed for p in s if p.seq.req == "long" and p.prefill]
    assert long_chunks and max(long_chunks) == 8  # capped at chunk while short decodes
    assert sum(long_chunks) >= 90
    # every step of the prefill also carried the short request's next token
    assert all(any(p.seq.req == "short" and not p.prefill for p in s) for s in mixed)


def test_a_prompt_alone_takes_whole_batches() -> None:
    batcher, model = Batcher(2, 32, 8), FakeModel(2, 32)
    run(batcher, model, {"long": prompt(3, 100)}, 2)
    assert [p.count for p in model.steps[0]] == [32]


def test_older_prompts_are_evaluated_first() -> None:
    batcher, model = Batcher(3, 16, 16), FakeModel(3, 16)
    for req in ("a", "b"):
        seq = batcher.admit(req, prompt(ord(req), 20))
        model.drop(seq.slot)
    first = batcher.plan()
    assert [(p.seq.req, p.count) for p in first] == [("a", 16)]


def test_a_free_slot_reuses_the_longest_cached_prefix() -> None:
    batcher, model = Batcher(2, 64, 16), FakeModel(2, 64)
    chat = prompt(5, 30)
    out = run(batcher, model, {"turn1": chat}, 10)
    seq = batcher.admit("turn2", chat + out["turn1"] + prompt(6, 4))
    assert seq.done == 39  # 30 prompt + 9 evaluated outputs; the 10th was never evaluated
    model.drop(seq.slot, seq.done)
    assert model.kv[seq.slot] == (chat + out["turn1"])[:39]
    other = batcher.admit("other", prompt(7, 10))
    assert other.slot != seq.slot and other.done == 0


def test_the_last_token_is_always_evaluated_again() -> None:
    batcher = Batcher(1, 64, 16)
    batcher.cached[0] = prompt(8, 12)
    seq = batcher.admit("same", prompt(8, 12))
    assert seq.done == 11 and [(p.start, p.count, p.logits) for p in batcher.plan()] == [
        (11, 1, True)]


def test_more_decoding_sequences_than_the_batch_take_turns() -> None:
    prompts = {f"r{i}": prompt(i, 1) for i in range(5)}
    alone = {r: run(Batcher(1, 2, 2), FakeModel(1, 2), {r: p}, 6)[r] for r, p in prompts.items()}
    model = FakeModel(5, 2)
    assert run(Batcher(5, 2, 2), model, prompts, 6) == alone


def test_admission_refuses_a_full_worker_and_a_duplicate() -> None:
    batcher = Batcher(1, 8, 8)
    batcher.admit("a", [1, 2])
    with pytest.raises(ValueError, match="no free slot"):
        batcher.admit("b", [1])
    batcher.release("a")
    batcher.admit("b", [1])
    with pytest.raises(ValueError, match="runs already"):
        batcher.admit("b", [1])


def test_released_without_cache_and_forgotten_caches() -> None:
    batcher = Batcher(2, 8, 8)
    seq = batcher.admit("a", [1, 2, 3])
    batcher.advance(batcher.plan())
    batcher.release("a", keep_cache=False)
    assert batcher.cached[seq.slot] == []
    seq = batcher.admit("b", [4, 5, 6])
    batcher.advance(batcher.plan())
    batcher.release("b")
    assert batcher.cached_tokens() == 3 and batcher.forget_caches() == [seq.slot]
    assert batcher.cached_tokens() == 0


ADAPTERS = {"r0": None, "r1": ("a", 1.0), "r2": ("b", 1.0), "r3": None, "r4": ("a", 0.5)}


def test_a_step_holds_one_adapter_setting_and_each_sequence_gets_what_it_gets_alone() -> None:
    prompts = {r: prompt(i, 4 + 7 * i) for i, r in enumerate(ADAPTERS)}
    alone = {r: run(Batcher(1, 64, 16), FakeModel(1, 64), {r: p}, 12, adapters=ADAPTERS)[r]
             for r, p in prompts.items()}
    assert len({tuple(a) for a in alone.values()}) == len(ADAPTERS)  # the key matters
    model = FakeModel(5, 64)
    assert run(Batcher(5, 64, 16), model, prompts, 12, {"r3": 2}, ADAPTERS) == alone
    # Both base sequences shared steps: a group runs together.
    assert any({p.seq.req for p in s} == {"r0", "r3"} for s in model.steps)


def test_adapter_groups_take_turns_step_by_step() -> None:
    """The group of the sequence that has waited longest goes next: with four groups
    decoding, each sequence is in every fourth step, none waits for another to finish."""
    prompts = {r: prompt(i, 3) for i, r in enumerate(ADAPTERS)}
    model = FakeModel(5, 64)
    run(Batcher(5, 64, 16), model, prompts, 20, adapters=ADAPTERS)
    for req in ADAPTERS:
        at = [-1] + [i for i, s in enumerate(model.steps) if any(p.seq.req == req for p in s)]
        assert max(b - a for a, b in itertools.pairwise(at)) <= 4, (req, at)


def test_an_adapter_group_keeps_the_steps_for_its_turn() -> None:
    """With turn 4, a switch comes at most every 4 steps (each costs llama.cpp a graph
    reserve); a sequence still waits no more than the other three groups' turns."""
    prompts = {r: prompt(i, 3) for i, r in enumerate(ADAPTERS)}
    alone = {r: run(Batcher(1, 64, 16), FakeModel(1, 64), {r: p}, 30, adapters=ADAPTERS)[r]
             for r, p in prompts.items()}
    model = FakeModel(5, 64)
    assert run(Batcher(5, 64, 16, turn=4), model, prompts, 30, adapters=ADAPTERS) == alone
    keys = [s[0].seq.adapter for s in model.steps]
    runs = [(k, len(list(g))) for k, g in itertools.groupby(keys)]
    for i, (key, n) in enumerate(runs):  # a shorter turn only when its group is done
        assert n >= 4 or key not in [k for k, _ in runs[i + 1:]], runs
    assert len(runs) < len(keys) / 3
    for req in ADAPTERS:
        at = [-1] + [i for i, s in enumerate(model.steps) if any(p.seq.req == req for p in s)]
        assert max(b - a for a, b in itertools.pairwise(at)) <= 3 * 4 + 1, (req, at)


def test_a_cached_prefix_is_reused_only_under_the_adapter_that_computed_it() -> None:
    batcher, model = Batcher(1, 64, 16), FakeModel(1, 64)
    chat = prompt(9, 20)
    run(batcher, model, {"t1": chat}, 4, adapters={"t1": ("a", 1.0)})
    base = batcher.admit("t2", chat)  # the slot's cache was computed under adapter a
    assert base.done == 0
    batcher.release("t2", keep_cache=False)
    run(batcher, model, {"t3": chat}, 4)
    assert batcher.admit("t4", chat, ("a", 0.5)).done == 0  # another scale, another key
    batcher.release("t4", keep_cache=False)
    run(batcher, model, {"t5": chat}, 4, adapters={"t5": ("a", 1.0)})
    assert batcher.admit("t6", chat, ("a", 1.0)).done == 19  # the same key: reused
