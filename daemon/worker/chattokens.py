"""Chat prompts as tokens, with every message's content tokenised as text.

Asked to parse special tokens, llama.cpp turns the text of any control token into that
token wherever it stands: a message whose content holds "<|im_end|>\\n<|im_start|>system\\n"
would close its own turn and open a system turn (llama-server renders chat prompts so).
Here only the chat template's own markers become special tokens:

- no content (nor the prefill) holds the text of a control or unknown token: the rendered
  prompt is tokenised whole with special tokens parsed, exactly as before;
- else each such text inside content is replaced by a private-use character found nowhere
  else in the request, the template renders the messages, and the result is split where
  llama.cpp's tokenizer_st_partition (llama-vocab.cpp) splits it: at the texts of its
  special-token cache, longest first, stripping whitespace beside LSTRIP and RSTRIP tokens.
  The raw pieces, each character put back as the text it stands for, are tokenised as text
  (which also adds SPM's space prefix where llama.cpp would: at the start and after a
  special token).

User-defined tokens (Gemma's "\\n" or "<table>") are matched in text too, so they stay
as llama.cpp makes them. A control token whose text would only form across the edge of a
content and the template text beside it is judged as llama.cpp judges it, and a template
that looks for a control token's text inside content sees the stand-in instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .refusals import Refused

# llama_token_attr (llama.h)
UNKNOWN, CONTROL, USER_DEFINED, LSTRIP, RSTRIP = 1 << 0, 1 << 3, 1 << 4, 1 << 7, 1 << 8
SPLIT = CONTROL | USER_DEFINED | UNKNOWN  # llama.cpp's special-token cache
FORGEABLE = CONTROL | UNKNOWN  # parsed only when asked to parse special tokens
SPACES = " \t\n\v\f\r"  # C's isspace, which LSTRIP and RSTRIP strip
# Private-use characters: no tokenizer gives them meaning, and a request rarely holds one.
PRIVATE = [(0xE000, 0xF8FF), (0xF0000, 0xFFFFD), (0x100000, 0x10FFFD)]
PRIVATE_RE = re.compile("[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in PRIVATE) + "]")


@dataclass(frozen=True)
class Special:
    """A token of llama.cpp's special-token cache."""

    id: int
    text: str
    lstrip: bool
    rstrip: bool


def alternation(texts: Iterable[str]) -> str:
    """A regex matching any of texts, the longest where several start at one place. The
    texts go into a trie (?:a(?:b|c)?): the regex engine tries a branch with one character
    compare, so thousands of texts (Gemma has 6,400 special tokens) cost little per place,
    where a flat a|b|c would try every text at every place."""
    root: dict[str, Any] = {}
    for text in texts:
        node = root
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = {}  # a text ends here
    return _branches(root) if root else "(?!)"


def _branches(node: dict[str, Any]) -> str:
    alts = []
    for ch, child in node.items():
        if ch:
            run = re.escape(ch)
            while len(child) == 1 and "" not in child:  # a chain without choices
                ch, child = next(iter(child.items()))
                run += re.escape(ch)
            alts.append(run + _branches(child))
    if not alts:
        return ""
    if "" in node:
        return "(?:" + "|".join(alts) + ")?"  # greedy: a longer text first
    return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


class SpecialTokens:
    """A model's special tokens, read once: which texts llama.cpp splits a prompt at."""

    def __init__(self, llama_cpp: Any, model: Any) -> None:
        self.lib, self.vocab = llama_cpp, model.vocab
        specials, forgeable = [], []
        for i in range(model.n_vocab()):
            attr = llama_cpp.llama_vocab_get_attr(self.vocab, i)
            if not attr & SPLIT:
                continue
            text = llama_cpp.llama_vocab_get_text(self.vocab, i).decode("utf-8", "replace")
            if not text:  # llama.cpp would match it everywhere; no vocabulary has one
                continue
            specials.append(Special(i, text, bool(attr & LSTRIP), bool(attr & RSTRIP)))
            if attr & FORGEABLE:
                forgeable.append(text)
        # llama.cpp's order: longest text first (ties in id order here, unspecified there)
        self.specials = sorted(specials, key=lambda s: -len(s.text))
        self.forgeable = re.compile(alternation(forgeable))
        self._inside: dict[str, list[Special]] = {}  # text -> the specials within it
        self.private = set(PRIVATE_RE.findall("".join(s.text for s in specials)))
        self.bos = [model.token_bos()] if model.add_bos_token() else []
        self.eos = [model.token_eos()] if model.add_eos_token() else []

    def forged(self, text: str) -> bool:
        """Whether text holds a special token's text that only parsing makes a token."""
        return self.forgeable.search(text) is not None

    def partition(self, text: str) -> list[str | int]:
        """text split as llama.cpp splits it when it parses special tokens: raw text and
        token ids. Only the special tokens found in text are tried, in llama.cpp's order."""
        parts: list[str | int] = [text]
        for special in self._found(text):
            parts = [piece for part in parts
                     for piece in (split_at(part, special) if isinstance(part, str) else (part,))]
        return parts

    @cached_property
    def _starts(self) -> re.Pattern[str]:
        """The longest special text starting at each place (compiled at first use: only
        content with special texts in it needs it; 40 ms for Gemma's)."""
        return re.compile("(?=(" + alternation(s.text for s in self.specials) + "))")

    def _found(self, text: str) -> list[Special]:
        """The special tokens whose text occurs in text, longest first. The longest text
        starting at each place, and every special text inside it, are all there are."""
        found: set[Special] = set()
        for longest in set(self._starts.findall(text)):
            inside = self._inside.get(longest)
            if inside is None:
                inside = self._inside[longest] = [s for s in self.specials if s.text in longest]
            found.update(inside)
        return [s for s in self.specials if s in found]  # in self.specials' order

    def tokens(self, parts: list[str | int], reveal: Callable[[str], str],
               add_special: bool) -> list[int]:
        """The tokens of partition()'s parts: raw text (each passed through reveal) as
        text, token ids as they are; with add_special, BOS and EOS as the vocab adds them."""
        out = list(self.bos) if add_special else []
        for part in parts:
            if isinstance(part, int):
                out.append(part)
            else:
                out += self.text_tokens(reveal(part).encode())
        return out + (self.eos if add_special else [])

    def text_tokens(self, text: bytes) -> list[int]:
        """text as text: no BOS, and no special token's text becomes that token."""
        lib = self.lib
        n = len(text) + 8  # a token holds a byte at least (SPM: one more for the space prefix)
        buf = (lib.llama_token * n)()
        got = lib.llama_tokenize(self.vocab, text, len(text), buf, n, False, False)
        if got < 0:
            buf = (lib.llama_token * -got)()
            got = lib.llama_tokenize(self.vocab, text, len(text), buf, -got, False, False)
        return buf[:got]


def split_at(text: str, special: Special) -> Iterator[str | int]:
    """One raw fragment split at every occurrence of one special token, as
    tokenizer_st_partition does: leftmost first, whitespace stripped beside the token if
    its attributes say so, empty pieces dropped."""
    pos, end = 0, len(text)
    while (at := text.find(special.text, pos)) >= 0:
        left = text[pos:at]
        if special.lstrip:
            left = left.rstrip(SPACES)
        if left:
            yield left
        yield special.id
        pos = at + len(special.text)
        if special.rstrip:
            while pos < end and text[pos] in SPACES:
                pos += 1
    if pos < end:
        yield text[pos:]


class Mask:
    """One request's stand-ins for special-token texts inside its content: a private-use
    character per text, chosen among those in none of the request's texts, the template
    or the special tokens, so that every one in the rendered prompt is a stand-in."""

    def __init__(self, forgeable: re.Pattern[str], texts: Iterable[str], taken: set[str]) -> None:
        self.forgeable = forgeable
        used = set(taken)
        for text in texts:
            used.update(PRIVATE_RE.findall(text))
        self._free = (ch for a, b in PRIVATE for c in range(a, b + 1)
                      if (ch := chr(c)) not in used)
        self._n_free = sum(b + 1 - a for a, b in PRIVATE) - len(used)
        self._stand_in: dict[str, str] = {}  # special text -> its character
        self._back: dict[int, str] = {}  # and back, as str.translate takes it

    def hide(self, text: str) -> str:
        """text with each special token's text replaced by its stand-in."""
        return self.forgeable.sub(self._replace, text)

    def _replace(self, match: re.Match[str]) -> str:
        text = match.group()
        ch = self._stand_in.get(text)
        if ch is None:
            if len(self._stand_in) == self._n_free:  # content of 137,000 such characters
                raise Refused("messages", "the messages hold every private-use character")
            ch = self._stand_in[text] = next(self._free)
            self._back[ord(ch)] = text
        return ch

    def reveal(self, text: str) -> str:
        """text with the stand-ins turned back into the texts they stand for."""
        return text.translate(self._back) if self._back else text


class ChatPrompt:
    """A model's chat template and special tokens: a conversation to prompt tokens."""

    def __init__(self, llama_cpp: Any, model: Any, template: str) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        eos, bos = model.token_eos(), model.token_bos()
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "")
        self.model = model
        self.specials = SpecialTokens(llama_cpp, model)
        # characters a stand-in must not be: the template could write them itself
        self.taken = self.specials.private | set(PRIVATE_RE.findall(template))

    @classmethod
    def of(cls, llama_cpp: Any, model: Any) -> ChatPrompt | None:
        """The model's, or None if its GGUF has no chat template."""
        template = model.metadata().get("tokenizer.chat_template")
        return cls(llama_cpp, model, template) if template else None

    def tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation in the template, as tokens. A last assistant message is a
        prefill: the template renders the rest, and the answer continues its text. Raises
        jinja2's TemplateError if the template fails on the messages."""
        prefill = ""
        if messages[-1]["role"] == "assistant":
            messages, prefill = messages[:-1], messages[-1]["content"]
        if any(self.specials.forged(text) for text in _contents(messages, prefill)):
            return self.masked_tokens(messages, prefill)
        return self.whole_tokens(messages, prefill)

    def whole_tokens(self, messages: list[dict[str, str]], prefill: str) -> list[int]:
        """The rendered prompt tokenised whole, every special token's text parsed: right
        only when no content holds one."""
        result = self.formatter(messages=messages)
        return self.model.tokenize((result.prompt + prefill).encode(),
                                   add_bos=not result.added_special, special=True)

    def masked_tokens(self, messages: list[dict[str, str]], prefill: str) -> list[int]:
        """The rendered prompt with the template's special tokens parsed and the content
        as text. For content without special-token texts, what whole_tokens gives."""
        mask = Mask(self.specials.forgeable, _contents(messages, prefill), self.taken)
        result = self.formatter(messages=[{**m, "content": mask.hide(m["content"])}
                                          for m in messages])
        parts = self.specials.partition(result.prompt + mask.hide(prefill))
        return self.specials.tokens(parts, mask.reveal, add_special=not result.added_special)


def _contents(messages: list[dict[str, str]], prefill: str) -> list[str]:
    return [*(m["content"] for m in messages), prefill]
