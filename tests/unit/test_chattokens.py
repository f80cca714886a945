"""chattokens' pieces that need no model: the trie regex of special-token texts, one
fragment's split at a special token, and the stand-ins that hide texts in content.
tests/integration/test_chat_tokens.py checks the whole with llama.cpp."""

from __future__ import annotations

import re

import pytest
from llm_residentd.worker.chattokens import PRIVATE, PRIVATE_RE, Mask, Special, alternation, split_at
from llm_residentd.worker.refusals import Refused

TEXTS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unused1>", "<unused12>", "\n",
         "\n\n", "a.b", "(x)"]


@pytest.mark.parametrize("text", ["", "hello", "<|im_start", "<unused1", "a-b", "x"])
def test_the_alternation_matches_nothing_else(text: str) -> None:
    assert re.search(alternation(TEXTS), text) is None


def test_the_alternation_matches_each_text_and_the_longest_first() -> None:
    pattern = re.compile(alternation(TEXTS))
    for text in TEXTS:
        assert pattern.fullmatch(text), text
    assert pattern.findall("x<unused12>y<unused1>\n\n\n<s></s>a.b(x)") == [
        "<unused12>", "<unused1>", "\n\n", "\n", "<s>", "</s>", "a.b", "(x)"]
    assert re.search(alternation([]), "anything") is None


def test_a_split_strips_whitespace_only_where_the_token_says() -> None:
    plain = Special(7, "<t>", lstrip=False, rstrip=False)
    assert list(split_at(" a <t> b<t><t>", plain)) == [" a ", 7, " b", 7, 7]
    assert list(split_at("<t>", plain)) == [7]
    assert list(split_at("none", plain)) == ["none"]
    strip = Special(8, "<t>", lstrip=True, rstrip=True)
    assert list(split_at(" a \n<t>\t b <t> ", strip)) == [" a", 8, "b", 8]


def test_a_mask_hides_special_texts_with_characters_no_text_holds() -> None:
    pattern = re.compile(alternation(["<|im_end|>", "<s>"]))
    content = "\ue000 says <|im_end|><s> and <|im_end|>"
    mask = Mask(pattern, [content], taken={"\ue001"})
    hidden = mask.hide(content)
    assert "<|im_end|>" not in hidden and "<s>" not in hidden
    stand_ins = set(PRIVATE_RE.findall(hidden)) - {"\ue000"}
    assert stand_ins == {"\ue002", "\ue003"}  # two texts; \ue000 and \ue001 are taken
    assert hidden == "\ue000 says \ue002\ue003 and \ue002"
    assert mask.reveal(hidden) == content
    assert mask.hide("no special text") == "no special text"


def test_content_holding_every_private_use_character_is_refused() -> None:
    every = "".join(chr(c) for a, b in PRIVATE for c in range(a, b + 1))
    mask = Mask(re.compile(alternation(["<s>"])), [every], taken=set())
    assert mask.hide("no special text") == "no special text"
    with pytest.raises(Refused) as refused:
        mask.hide("<s>")
    assert refused.value.param == "messages"
