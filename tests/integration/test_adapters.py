"""LoRA adapters per request through the daemon (tests/tinymodel.py writes the tiny model's
adapters): submit with `adapter` over the socket, llmctl and HTTP; the models op lists the
adapters and why one failed to load; an unknown name is refused at submit, an adapter for
another base model fails its request with llama.cpp's reason, and the model goes on serving.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tinymodel
from harness import Daemon, tiny_config
from http_helpers import unix_http
from llmctl.client import LlmctlError

GREEDY = {"prompt": "the quick brown fox", "raw": True, "temperature": 0.0, "max_tokens": 12,
          "ignore_eos": True, "model": "tiny"}


@pytest.fixture(scope="module")
def lora_daemon(tmp_path_factory, tiny_model_path: Path):
    d = tmp_path_factory.mktemp("lora")
    a = tinymodel.write_tiny_lora(d / "a.gguf", seed=1)
    other = tinymodel.write_tiny_lora(d / "other.gguf", n_embd=32, n_ff=64)
    extra = f'\n[models.tiny.adapters]\na = "{a}"\nother = "{other}"\n'
    daemon = Daemon(d, tiny_config(tiny_model_path, parallel=2, model_extra=extra))
    daemon.start()
    yield daemon
    daemon.stop()


def _run(d: Daemon, **fields: object) -> tuple[str, dict]:
    with d.client() as c:
        events = list(c.submit(**{**GREEDY, **fields}).events())
    return "".join(e["text"] for e in events if e["event"] == "token"), events[-1]


def test_a_request_gets_its_adapter_and_the_next_one_the_base_model(lora_daemon) -> None:
    base, done = _run(lora_daemon)
    assert done["event"] == "done", done
    with_a, done = _run(lora_daemon, adapter="a")
    assert done["event"] == "done" and with_a != base, (with_a, base)
    assert _run(lora_daemon)[0] == base
    r = lora_daemon.llmctl("submit", "--raw", "-m", "tiny", "--temperature", "0", "-n", "12",
                           "--ignore-eos", "--adapter", "a", "--adapter-scale", "1",
                           GREEDY["prompt"])
    assert r.returncode == 0 and r.stdout.strip() == with_a.strip(), r
    body = {k: v for k, v in GREEDY.items() if k != "raw"} | {"adapter": "a"}
    http = unix_http(lora_daemon, "POST", "/v1/completions", body)
    assert http.status_code == 200, http.text
    assert http.json()["choices"][0]["text"] == with_a


def test_models_lists_the_adapters_and_why_one_failed(lora_daemon) -> None:
    (model,) = json.loads(lora_daemon.llmctl("models", "--json").stdout)
    assert model["adapters"]["a"]["error"] is None
    assert "incorrect shape" in model["adapters"]["other"]["error"]
    out = lora_daemon.llmctl("models").stdout
    assert "tiny adapter a: " in out and "tiny adapter other: failed: " in out


def test_an_adapter_for_another_base_is_refused_with_its_reason_and_the_model_serves(
        lora_daemon) -> None:
    """The worker said at load that llama.cpp refused it: submit refuses it at once
    (a worker that has not said so yet fails the request itself: test_worker_adapters)."""
    with lora_daemon.client() as c:
        before = c.status()["models"]["tiny"]["outcomes"]
        with pytest.raises(LlmctlError) as err:
            c.submit(**{**GREEDY, "adapter": "other"})
        assert c.status()["models"]["tiny"]["outcomes"] == before
    assert err.value.code == "bad_request"
    assert "adapter 'other' of model 'tiny' failed to load: " in err.value.message
    assert "incorrect shape" in err.value.message
    assert _run(lora_daemon)[1]["event"] == "done"


@pytest.mark.parametrize("fields, message", [
    ({"adapter": "nope"}, "model 'tiny' has no adapter 'nope' (its adapters: a, other)"),
    ({"adapter_scale": 0.5}, "adapter_scale needs adapter"),
    ({"adapter": "a", "adapter_scale": 9.0}, "adapter_scale"),
])
def test_a_bad_adapter_field_is_refused_at_submit(lora_daemon, fields, message) -> None:
    with lora_daemon.client() as c:
        before = c.status()["models"]["tiny"]
        with pytest.raises(LlmctlError) as err:
            c.submit(**{**GREEDY, **fields})
        after = c.status()["models"]["tiny"]
    assert err.value.code == "bad_request" and message in err.value.message
    assert after["outcomes"] == before["outcomes"] and after["queued"] == before["queued"]
