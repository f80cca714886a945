"""Stop sequences over streamed text: end at the first stop string, and never stream a
piece of one.

Text arrives a token at a time, and a stop string may span tokens ("<|end" then "|>").
Streamed text cannot be taken back, so the scanner holds back the end of the text that
could still grow into a stop string (the longest suffix that is a prefix of one) until
the next piece settles it. The stop string itself is not returned, nor anything after.
"""

from __future__ import annotations


class StopScanner:
    def __init__(self, stops: list[str], held: str = "") -> None:
        """held: text held back when the request was preempted (its resume carries it)."""
        self.stops = [s for s in stops if s]
        self.held = held
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text that is safe to stream after this piece. Once a stop string is found
        it returns the text before it, sets stopped, and returns "" ever after."""
        if self.stopped:
            return ""
        text = self.held + text
        if not self.stops:
            self.held = ""
            return text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self.held = True, ""
            return text[:min(found)]
        keep = self._partial(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def finish(self) -> str:
        """The end of the text, when generation ended without a stop string."""
        held, self.held = self.held, ""
        return "" if self.stopped else held

    def _partial(self, text: str) -> int:
        """The length of the longest end of text that begins some stop string (only
        places holding a stop string's first character are tried: a few per token)."""
        firsts = {s[0] for s in self.stops}
        for i in range(max(0, len(text) - max(len(s) for s in self.stops) + 1), len(text)):
            if text[i] in firsts and any(s.startswith(text[i:]) for s in self.stops):
                return len(text) - i
        return 0
