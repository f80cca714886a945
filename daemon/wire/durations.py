"""Keep-alive durations as ollama takes them: "5m", "1h30m", "90s", 300, "0", "-1"."""

from __future__ import annotations

import re

MAX_KEEP_ALIVE = 365 * 86400.0  # longer is a typo; -1 keeps a model loaded forever
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_keep_alive(value: str | int | float) -> float | None:
    """Seconds to keep a model loaded after its last request; None is forever (any
    negative value, as in ollama), 0 unloads at once. ValueError says what is wrong."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a duration such as \"5m\" or a number of seconds, "
                         f"got {type(value).__name__}")
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = _units(text)
    if seconds != seconds:  # NaN
        raise ValueError(f"{text!r} is not a duration")
    if seconds < 0:
        return None
    if seconds > MAX_KEEP_ALIVE:
        raise ValueError(f"{text!r} is longer than a year; use -1 to keep the model loaded")
    return seconds


def _units(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("-")
    parts = _PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise ValueError(f"{text!r} is not a duration (examples: 30s, 5m, 1h30m, 0, -1)")
    return sign * sum(float(n) * _UNITS[u] for n, u in parts)


def describe(seconds: float | None) -> str:
    """A keep-alive for people: "forever", "0s", "5m", "1h30m"."""
    if seconds is None:
        return "forever"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{sec}s" if sec else "")
    return out or "0s"
