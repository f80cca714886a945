"""llmctl ps: the models in memory and when each unloads, as `ollama ps`."""

from __future__ import annotations

import argparse
from typing import Any

from ..client import Client
from ..output import fmt_bytes, show, table
from . import EXIT_OK, Command


def _ps_row(m: dict[str, Any]) -> list[Any]:
    if m["state"] != "ready":
        until = m["waiting"] or m["state"]
    elif m["unload_in_s"] is None:
        until = "forever" if m["keep_alive_s"] is None else f"busy (then {m['keep_alive']})"
    else:
        until = f"in {m['unload_in_s']:.0f} s"
    return [m["name"], m["state"], fmt_bytes(m["memory_bytes"]), *kv_columns(m),
            f"{m['slots_busy']}/{m['slots']}", _cache(m.get("prompt_cache")),
            m["keep_alive"], until]


def _cache(c: dict[str, Any] | None) -> str:
    """The prompt cache in one cell: bytes in memory + on disk, and its hits/lookups."""
    if not c or not (c["limit"] or c["disk_limit"]):
        return "off"
    lookups = c["hits"] + c["misses"]
    disk = f"+{fmt_bytes(c['disk_bytes'])} disk" if c["disk_limit"] else ""
    return f"{fmt_bytes(c['bytes'])}{disk}, {c['hits']}/{lookups} hits"


KV_HEADERS = ["KV K/V", "KV/CELL"]


def kv_columns(m: dict[str, Any]) -> list[str]:
    """The KV cache's types ("q8_0/q8_0") and the bytes of one cell in them (all layers);
    "-" for an entry of a daemon that does not say."""
    if m.get("cache_type_k") is None:
        return ["-", "-"]
    return [f"{m['cache_type_k']}/{m['cache_type_v']}", fmt_bytes(m.get("kv_cell_bytes"))]


def cmd_ps(client: Client, args: argparse.Namespace) -> int:
    show(args, {"models": client.call("ps")["models"]},
         lambda r: table(["NAME", "STATE", "MEMORY", *KV_HEADERS, "SLOTS", "PROMPT_CACHE",
                          "KEEP_ALIVE",
                          "UNLOADS"],
                         [_ps_row(m) for m in r["models"]]))
    return EXIT_OK


COMMAND = Command(
    "ps", help="the models in memory",
    description="List the loaded models (and those loading or unloading): memory measured, "
    "the KV cache's types and bytes per cell, slots busy/total, keep_alive, and when each "
    "will unload once idle, as `ollama ps`.",
    run=cmd_ps)
