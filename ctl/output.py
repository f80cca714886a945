"""How llmctl prints: JSON lines, aligned tables, sizes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


def error_json(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}, **extra}


def show(args: argparse.Namespace, reply: Any, text: Callable[[Any], str]) -> None:
    """The reply as one JSON object with --json, else as text for a person."""
    if args.json:
        emit_json(reply)
    else:
        print(text(reply))


def tty(args: argparse.Namespace) -> bool:
    """Whether stderr may carry notes meant for a person: not with --json, not to a pipe."""
    return not args.json and sys.stderr.isatty()


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[("-" if c is None else str(c)) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return "-"
