"""KV cache types (models.NAME.cache_type_k/v) with real models: a daemon whose model keeps
its cache in q8_0 loads, generates and reports the types and the bytes per cell in status
and ps; a model whose head size a quantized type cannot hold fails to load naming the
key, beside it. Then the worker alone over its socketpair: the load it refuses, naming the
setting, also where llama.cpp would not (no flash attention) and where only llama.cpp
refuses (a quantized V cache without flash attention, which the config refuses first)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tinymodel
from harness import tiny_config, wait_for
from llm_residentd.wire.protocol import recv_frame, send_frame


@pytest.fixture(scope="module")
def heads32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with 2 heads of 32 elements: q8_0's and q4_0's blocks fit them (the
    plain tiny model's heads have 16)."""
    return tinymodel.write_tiny_model(tmp_path_factory.mktemp("heads32") / "h32.gguf",
                                      n_embd=64, n_head=2)


def test_a_q8_0_cache_loads_generates_and_shows_in_status_and_ps(start_daemon, heads32,
                                                                 tiny_model_path):
    narrow = (f'\n[models.narrow]\npath = "{tiny_model_path}"\nload = "at_start"\n'
              'cache_type_k = "q8_0"\n')
    d = start_daemon(tiny_config(heads32, model_extra='cache_type_k = "q8_0"\n'
                                 'cache_type_v = "q8_0"\n') + narrow, wait=False)
    wait_for(lambda: d.socket.exists(), timeout=60, what="socket")
    assert d.llmctl("wait", "tiny", "--timeout", "120").returncode == 0
    with d.client() as c:
        events = list(c.submit("the quick brown fox", max_tokens=8, temperature=0,
                               raw=True, ignore_eos=True).events())
        assert events[-1]["event"] == "done", events[-1]
        assert events[-1]["stats"]["completion_tokens"] == 8
        tiny = c.status()["models"]["tiny"]
        # 2 layers x (K + V) rows of 2 heads x 32 = 64 elements: 2 blocks of 34 bytes each
        assert (tiny["cache_type_k"], tiny["cache_type_v"], tiny["kv_cell_bytes"]) == (
            "q8_0", "q8_0", 2 * (68 + 68))
        models = wait_for(lambda: (m := {x["name"]: x for x in c.models()})["narrow"]["state"]
                          == "unavailable" and m, timeout=60, what="narrow unavailable")
    error = models["narrow"]["error"]
    assert ("models.narrow.cache_type_k: q8_0 packs a K head into blocks of 32 elements, "
            "and this model's K heads have 16") in error, error
    entries = {m["name"]: m for m in json.loads(d.llmctl("ps", "--json").stdout)["models"]}
    assert (entries["tiny"]["cache_type_k"], entries["tiny"]["kv_cell_bytes"]) == ("q8_0", 272)
    table = d.llmctl("ps")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("tiny "))
    assert row.split()[3:5] == ["q8_0/q8_0", "272B"], table.stdout
    assert "KV/CELL" in d.llmctl("status").stdout


# -- the worker alone -----------------------------------------------------------------------


def load(model: Path, **fields: Any) -> tuple[dict[str, Any], socket.socket, subprocess.Popen]:
    """A worker sent a Load with these fields; its first answer."""
    sock, child = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-m", "llm_residentd.worker", "--fd",
                             str(child.fileno())], pass_fds=[child.fileno()],
                            stderr=subprocess.DEVNULL)
    child.close()
    send_frame(sock, {"type": "load", "path": str(model), "n_ctx": 256, "n_batch": 64,
                      "threads": 1, "chat_template": False, "seed": 1, "stream_interval": 0.0,
                      "parallel": 2, **fields})
    sock.settimeout(60)
    return recv_frame(sock), sock, proc


def refused(model: Path, **fields: Any) -> dict[str, Any]:
    answer, sock, proc = load(model, **fields)
    assert proc.wait(30) == 1
    sock.close()
    assert answer["type"] == "load_failed", answer
    return answer


@pytest.mark.parametrize("flash_attn", [True, False])
def test_the_worker_refuses_a_type_the_heads_do_not_fit_naming_the_setting(tiny_model_path,
                                                                           flash_attn):
    """Without flash attention llama.cpp itself opened the context (and decoded with rows of
    half a block); the worker refuses both ways."""
    answer = refused(tiny_model_path, flash_attn=flash_attn, cache_type_k="q4_0")
    assert answer["param"] == "cache_type_k"
    assert answer["message"].startswith("q4_0 packs a K head into blocks of 32 elements, "
                                        "and this model's K heads have 16")
    answer = refused(tiny_model_path, flash_attn=True, cache_type_v="q8_0")
    assert answer["param"] == "cache_type_v" and "V heads have 16" in answer["message"]


def test_llama_cpps_own_refusal_names_the_setting(heads32):
    """A quantized V cache without flash attention: the config refuses it, and a Load that
    asks for it anyway fails with llama.cpp's reason, naming cache_type_v."""
    answer = refused(heads32, flash_attn=False, cache_type_v="q8_0")
    assert answer["param"] == "cache_type_v"
    assert "quantized V cache requires flash_attn" in answer["message"], answer


def test_an_unknown_type_is_refused_with_the_choices(heads32):
    answer = refused(heads32, flash_attn=True, cache_type_k="q8")
    assert answer["param"] == "cache_type_k"
    assert answer["message"] == ("no KV cache type 'q8' (one of f32, f16, bf16, q8_0, q4_0, "
                                 "q4_1, iq4_nl, q5_0, q5_1)")


@pytest.mark.parametrize(("type_k", "type_v"), [("q8_0", "q8_0"), ("q4_0", "q4_0"),
                                                ("bf16", "iq4_nl"), ("q8_0", "f16")])
def test_the_worker_serves_two_slots_with_quantized_caches(heads32, type_k, type_v):
    answer, sock, proc = load(heads32, flash_attn=True, cache_type_k=type_k,
                              cache_type_v=type_v)
    assert answer["type"] == "ready", answer
    try:
        for req in ("a", "b"):
            send_frame(sock, {"type": "generate", "req": req, "params": {
                "prompt": "the quick brown fox", "max_tokens": 12, "temperature": 0.0,
                "raw": True, "ignore_eos": True}})
        ends = {}
        while len(ends) < 2:
            msg = recv_frame(sock)
            if msg["type"] in ("done", "error"):
                ends[msg["req"]] = msg
        assert all(e["type"] == "done" and e["stats"]["completion_tokens"] == 12
                   for e in ends.values()), ends
    finally:
        send_frame(sock, {"type": "shutdown"})
        proc.wait(30)
        sock.close()
