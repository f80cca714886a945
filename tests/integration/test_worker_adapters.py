"""LoRA adapters per request, in a real worker over its socketpair with the tiny model and
tiny adapters the tests write (tests/tinymodel.py): an adapter changes the output, the base
output comes back exactly without it, requests with different adapters (and none) share
one worker and each gives what it gives alone, and an adapter that does not fit the base
model, or a name the worker does not have, fails its request only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import tinymodel
from test_worker_batching import PROMPTS, Worker

PROMPT = PROMPTS[0]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("lora")
    return {"a": str(tinymodel.write_tiny_lora(d / "a.gguf", seed=1)),
            "b": str(tinymodel.write_tiny_lora(d / "b.gguf", seed=2)),
            # for a model with another embedding size: llama.cpp refuses it
            "other": str(tinymodel.write_tiny_lora(d / "other.gguf", n_embd=32, n_ff=64))}


@pytest.fixture(scope="module")
def solo(tiny_model_path: Path, adapters: dict[str, str]) -> Iterator[Worker]:
    """A one-slot worker: each request alone, all in the same slot one after another."""
    w = Worker(tiny_model_path, parallel=1, adapters=adapters)
    yield w
    w.close()


def one(w: Worker, **fields: object) -> tuple[str, dict]:
    text, ends = w.run({"r": {"prompt": PROMPT, **fields}})
    return text["r"], ends["r"]


def test_the_worker_reports_which_adapters_loaded(solo: Worker) -> None:
    status = solo.ready["adapters"]
    assert status["a"] == status["b"] == ""
    assert "incorrect shape" in status["other"] and "wrong base model" in status["other"]


def test_an_adapter_changes_the_output_and_the_base_comes_back_exactly(solo: Worker) -> None:
    """The one slot keeps its cache between requests: the base request after the adapter
    one must not reuse the prefix the adapter computed (nor the other way round)."""
    base, end = one(solo)
    assert end["type"] == "done", end
    with_a, end = one(solo, adapter="a")
    assert end["type"] == "done", end
    assert with_a != base
    assert one(solo)[0] == base  # after the adapter, in the same worker and slot
    assert one(solo, adapter="a")[0] == with_a  # and the adapter's again
    half = one(solo, adapter="a", adapter_scale=0.5)[0]
    assert half not in (base, with_a)
    assert one(solo, adapter="a", adapter_scale=0.0)[0] == base  # scale 0: the base model


def test_different_adapters_share_one_worker_and_each_matches_its_solo_output(
        solo: Worker, tiny_model_path: Path, adapters: dict[str, str]) -> None:
    cases = {"none": {}, "a": {"adapter": "a"}, "b": {"adapter": "b"},
             "a_half": {"adapter": "a", "adapter_scale": 0.5}}
    alone = {req: one(solo, **fields)[0] for req, fields in cases.items()}
    assert len(set(alone.values())) == len(cases)  # each setting gives its own text
    w = Worker(tiny_model_path, parallel=len(cases), adapters=adapters)
    try:
        text, ends = w.run({req: {"prompt": PROMPT, **f} for req, f in cases.items()})
        assert all(e["type"] == "done" for e in ends.values()), ends
        assert text == alone
        # Twice more, the slots' caches now computed under other adapters.
        text, _ = w.run({req: {"prompt": PROMPT, **f} for req, f in reversed(cases.items())})
        assert text == alone
    finally:
        w.close()


def test_an_adapter_for_another_base_fails_its_request_and_the_model_still_serves(
        solo: Worker) -> None:
    base = one(solo)[0]
    text, end = one(solo, adapter="other")
    assert end["type"] == "error" and end["code"] == "bad_request", end
    assert "'other' failed to load" in end["message"] and "incorrect shape" in end["message"]
    assert text == ""
    assert one(solo)[0] == base


def test_an_unknown_adapter_fails_its_request_only(tiny_model_path: Path,
                                                   adapters: dict[str, str]) -> None:
    w = Worker(tiny_model_path, parallel=2, adapters=adapters)
    try:
        text, ends = w.run({"ok": {"prompt": PROMPT, "adapter": "a"},
                            "bad": {"prompt": PROMPT, "adapter": "nope"}})
        assert ends["bad"]["type"] == "error" and ends["bad"]["code"] == "bad_request"
        assert "no adapter 'nope'" in ends["bad"]["message"]
        assert ends["ok"]["type"] == "done" and text["ok"]
    finally:
        w.close()
