"""submit with messages, stop strings and a JSON Schema or grammar, through the daemon and
the tiny model: the conversation is rendered with the GGUF's chat template, stop strings
cut the text, and constrained output parses."""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp
import pytest
import tinymodel
from harness import tiny_config

GREEDY = {"temperature": 0.0, "seed": 1}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "n", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "n": {"type": "integer"},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"enum": ["red", "blue"]}}}}


@pytest.fixture(scope="module")
def chat_daemon(tmp_path_factory, tiny_model_path: Path, tiny_chat_model_path: Path):
    """The plain tiny model (no template) and the one with ChatML, one worker each."""
    from harness import Daemon
    config = tiny_config(tiny_model_path) + (
        f'\n[models.chat]\npath = "{tiny_chat_model_path}"\nn_ctx = 512\nworkers = 1\n'
        "max_tokens = 16\nthreads = 1\n")
    d = Daemon(tmp_path_factory.mktemp("chatd"), config)
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def vocab(tiny_chat_model_path: Path):
    return llama_cpp.Llama(model_path=str(tiny_chat_model_path), vocab_only=True, verbose=False)


def _run(d, **fields):
    with d.client() as c:
        stream = c.submit(**fields)
        events = list(stream.events())
    text = "".join(e["text"] for e in events if e["event"] == "token")
    return text, events[-1]


def _tokens(vocab, text: str) -> int:
    return len(vocab.tokenize(text.encode(), add_bos=False, special=True))


CONVERSATION = [{"role": "system", "content": "you answer in one word"},
                {"role": "user", "content": "what is the big red dog"},
                {"role": "assistant", "content": "a dog"},
                {"role": "user", "content": "and the lazy cat"}]


def test_the_whole_conversation_is_rendered_with_the_models_template(chat_daemon, vocab):
    text, done = _run(chat_daemon, messages=CONVERSATION, model="chat", max_tokens=8, **GREEDY)
    assert done["event"] == "done", done
    assert done["stats"]["prompt_tokens"] == _tokens(vocab, tinymodel.chatml(CONVERSATION))
    assert text
    # a prompt is one user message
    one = [{"role": "user", "content": "hello there"}]
    as_prompt, done_p = _run(chat_daemon, prompt="hello there", model="chat", max_tokens=4,
                             **GREEDY)
    as_messages, done_m = _run(chat_daemon, messages=one, model="chat", max_tokens=4, **GREEDY)
    assert as_prompt == as_messages
    assert done_p["stats"]["prompt_tokens"] == done_m["stats"]["prompt_tokens"] == _tokens(
        vocab, tinymodel.chatml(one))


def test_an_assistant_message_last_is_continued(chat_daemon, vocab):
    messages = [*CONVERSATION[:2], {"role": "assistant", "content": "the answer is"}]
    _, done = _run(chat_daemon, messages=messages, model="chat", max_tokens=2, **GREEDY)
    assert done["stats"]["prompt_tokens"] == _tokens(
        vocab, tinymodel.chatml(CONVERSATION[:2]) + "the answer is")


def test_messages_to_a_model_without_a_template_are_a_bad_request_event(chat_daemon):
    text, end = _run(chat_daemon, messages=CONVERSATION, model="tiny")
    assert end["event"] == "error" and end["error"]["code"] == "bad_request", end
    assert "chat template" in end["error"]["message"] and text == ""
    assert end["error"]["param"] == "messages"  # the field at fault, as HTTP's param says


def test_a_stop_string_ends_the_text_before_it(chat_daemon):
    common = {"prompt": "the quick brown fox", "raw": True, "model": "tiny", **GREEDY}
    reference, done = _run(chat_daemon, max_tokens=40, ignore_eos=True, **common)
    assert done["stats"]["finish_reason"] == "length" and len(reference) > 30
    stop = reference[12:19]
    text, done = _run(chat_daemon, max_tokens=40, stop=["never there", stop], **common)
    assert text == reference[:reference.index(stop)]
    assert done["stats"]["finish_reason"] == "stop"
    assert done["stats"]["completion_tokens"] < 40


def _matches(value, schema) -> bool:
    """SCHEMA's rules, checked by hand (no jsonschema dependency for one schema)."""
    return (set(value) == {"name", "n", "tags"} and isinstance(value["name"], str)
            and len(value["name"]) <= 12 and isinstance(value["n"], int)
            and isinstance(value["tags"], list) and len(value["tags"]) <= 3
            and all(t in ("red", "blue") for t in value["tags"]))


@pytest.mark.parametrize("model", ["tiny", "chat"])
def test_json_schema_output_parses_and_matches_even_from_random_weights(chat_daemon, model):
    text, done = _run(chat_daemon, prompt="give me json", model=model, max_tokens=200,
                      json_schema=SCHEMA, **GREEDY)
    assert done["event"] == "done", done
    assert done["stats"]["finish_reason"] == "stop", (text, done)
    assert _matches(json.loads(text), SCHEMA), text
    # {} is any JSON value
    text, done = _run(chat_daemon, prompt="give me json", model=model, max_tokens=200,
                      json_schema={}, **GREEDY)
    assert done["stats"]["finish_reason"] == "stop"
    json.loads(text)


def test_json_cut_by_max_tokens_says_length(chat_daemon):
    text, done = _run(chat_daemon, prompt="x", model="tiny", max_tokens=3, json_schema=SCHEMA,
                      **GREEDY)
    assert done["stats"]["finish_reason"] == "length" and done["stats"]["completion_tokens"] == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_a_grammar_constrains_sampled_text_too(chat_daemon):
    grammar = 'root ::= ("yes" | "no") "." '
    for seed in (1, 2, 3):
        text, done = _run(chat_daemon, prompt="well?", model="tiny", max_tokens=20,
                          grammar=grammar, temperature=1.0, seed=seed)
        assert text in ("yes.", "no.") and done["stats"]["finish_reason"] == "stop", text


@pytest.mark.parametrize(("fields", "words"), [
    ({"grammar": "root ::= foo"}, "grammar: llama.cpp cannot use it: Undefined rule "
                                  "identifier 'foo'"),
    ({"grammar": 'start ::= "a"'}, "grammar does not contain a 'root' symbol"),
    ({"json_schema": {"type": "foo"}}, "json_schema: llama.cpp's converter cannot express it"),
])
def test_a_grammar_llama_cpp_refuses_is_a_bad_request_event(chat_daemon, fields, words):
    text, end = _run(chat_daemon, prompt="x", model="tiny", **fields)
    assert end["event"] == "error" and end["error"]["code"] == "bad_request", end
    assert words in end["error"]["message"] and text == ""
    assert end["error"]["param"] == next(iter(fields))
    chat_daemon.assert_serving()
