"""The submit op's chat fields (messages, stop, json_schema, grammar), checked before a
request is queued, and the stop-string scanner that the worker streams through."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from llm_residentd.front import ops
from llm_residentd.front.ops import docs
from llm_residentd.front.ops.submit import accept
from llm_residentd.wire.protocol import ProtocolError
from llm_residentd.worker.stopstrings import StopScanner

SUBMIT = ops.OPS["submit"]
USER = {"role": "user", "content": "hi"}


def _refusal(msg: dict) -> str:
    with pytest.raises(ProtocolError) as err:
        accept(_service(), ops.validate(SUBMIT, msg), uid=0, sink=None)
    assert err.value.code == "bad_request"
    return err.value.message


class _Service:
    def __init__(self) -> None:
        self.config = SimpleNamespace(models={"tiny": SimpleNamespace(max_tokens=16, n_ctx=256)})
        self.submitted: list[tuple] = []

    def submit(self, *args, **kw):
        self.submitted.append((args, kw))
        return SimpleNamespace(id="r1", model=args[0]), 0


def _service() -> _Service:
    return _Service()


@pytest.mark.parametrize(("msg", "words"), [
    ({"messages": []}, "the number of items in messages must be at least 1"),
    ({"messages": "hi"}, "messages must be an array, not string"),
    ({"messages": ["hi"]}, "messages[0] must be a map, not string"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0]: role must be one of system, "
                                                      "user, assistant, not 'bot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0]: content must be a string"),
    ({"messages": [{"role": "user"}]}, "messages[0]: content must be a string"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]},
     "messages[0]: a message has only role and content, not name"),
    ({"messages": [USER, {"role": "system", "content": "x"}]},
     "messages: the last message must be from user or assistant, not system"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "there must be a user message"),
    ({"prompt": "x", "stop": "END"}, "stop must be an array, not string"),
    ({"prompt": "x", "stop": [""]}, "the length of stop[0] must be at least 1"),
    ({"prompt": "x", "stop": ["a" * 201]}, "the length of stop[0] must be at most 200"),
    ({"prompt": "x", "stop": ["a"] * 9}, "the number of items in stop must be at most 8"),
    ({"prompt": "x", "json_schema": "{}"}, "json_schema must be a map, not string"),
    ({"prompt": "x", "json_schema": {"const": b"x"}}, "json_schema: not a JSON value"),
    ({"prompt": "x", "grammar": ""}, "the length of grammar must be at least 1"),
])
def test_field_shapes_are_refused_with_the_field_named(msg, words):
    with pytest.raises(ProtocolError) as err:
        ops.validate(SUBMIT, msg)
    assert err.value.code == "bad_request"
    assert words in err.value.message


@pytest.mark.parametrize(("msg", "words"), [
    ({}, "exactly one of 'prompt' and 'messages'"),
    ({"prompt": "x", "messages": [USER]}, "exactly one of 'prompt' and 'messages'"),
    ({"messages": [USER], "raw": True}, "raw applies to a prompt"),
    ({"prompt": "x", "json_schema": {}, "grammar": "root ::= \"a\""}, "not both"),
    ({"prompt": "x", "grammar": "root ::= \"a\"", "ignore_eos": True}, "ignore_eos cannot go"),
])
def test_combinations_are_refused_before_queueing(msg, words):
    assert words in _refusal(msg)


def test_a_conversation_and_the_output_fields_reach_the_worker_params():
    service = _service()
    messages = [{"role": "system", "content": "be brief"}, USER,
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    args = ops.validate(SUBMIT, {"messages": messages, "stop": ["\n\n", "END"],
                                 "json_schema": {"type": "object"}})
    accept(service, args, uid=5, sink=None)
    (model, params, _, _, uid), _ = service.submitted[0]
    assert (model, params.prompt, uid) == ("tiny", "", 5)
    assert params.messages == messages and params.stop == ["\n\n", "END"]
    assert params.json_schema == {"type": "object"} and params.grammar is None
    # an assistant message last is accepted: the answer continues its text
    ops.validate(SUBMIT, {"messages": [USER, {"role": "assistant", "content": "{"}]})


def test_the_field_table_renders_arrays_with_their_items():
    table = docs.fields_table(SUBMIT)
    assert "| `stop` | array of strings | no | at most 8 items; each 1 to 200 characters |" in table
    assert "| `messages` | array of maps | no | at least 1 item |" in table
    assert "| `json_schema` | map | no |  |" in table


# -- the stop-string scanner ------------------------------------------------------------

def _scan(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    scanner = StopScanner(stops)
    out = [scanner.feed(p) for p in pieces]
    out.append(scanner.finish())
    return out, scanner.stopped


def test_a_stop_string_across_pieces_is_never_streamed_in_part():
    out, stopped = _scan(["<|end|>"], ["Hello", " <", "|en", "d|> after", " more"])
    assert out == ["Hello", " ", "", "", "", ""] and stopped


def test_a_held_back_start_that_does_not_complete_is_streamed_later():
    out, stopped = _scan(["<|end|>"], ["a <|", "en", "x b"])
    assert "".join(out) == "a <|enx b" and out[0] == "a " and out[2] == "<|enx b"
    assert not stopped


def test_held_text_is_flushed_at_the_end_and_the_earliest_stop_wins():
    assert _scan(["abc"], ["xx ab"]) == (["xx ", "ab"], False)
    out, stopped = _scan(["world", "o w"], ["hello wor", "ld"])
    assert "".join(out) == "hell" and stopped


def test_only_as_much_as_could_begin_a_stop_is_held():
    scanner = StopScanner(["\n\n"])
    assert scanner.feed("one\n") == "one" and scanner.held == "\n"
    assert scanner.feed("two") == "\ntwo" and scanner.held == ""


def test_no_stops_streams_everything_and_a_resumed_scanner_keeps_its_tail():
    assert _scan([], ["a", "b"]) == (["a", "b", ""], False)
    resumed = StopScanner(["STOP"], held="ST")  # what a preempted request carried
    assert resumed.feed("OP and") == "" and resumed.stopped
