"""The events an accepted submit streams to its client, declared once.

The control socket sends each as one map, {"id", "request", "event": KIND, ...fields}
(the server adds id and request); the HTTP front reads the same objects. A request's
stream ends with exactly one terminal event (Done or Error): whoever carries a request's
events to a client tracks it until `terminal`. docs/protocol.md's list of events is
generated from this file.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from .protocol import ERROR_CODES


class _Event(msgspec.Struct, tag_field="event", kw_only=True):
    terminal: ClassVar[bool] = False  # whether it ends the request's stream


class Loading(_Event, tag="loading"):
    """Its model is loading: sent when the request is accepted while the model loads, and
    to each queued request when a load starts for it."""

    model: str  # the model being loaded


class Token(_Event, tag="token"):
    """Generated text (section 6.3)."""

    text: str  # never empty
    tokens: int  # how many tokens the text covers


class Preempted(_Event, tag="preempted"):
    """A higher-priority request took the worker; this one is queued again and continues
    where it stopped (section 6.3)."""

    tokens: int  # tokens generated so far
    resume: str  # restore (its KV cache was saved) or recompute


class Done(_Event, tag="done"):
    """The request finished (terminal)."""

    terminal: ClassVar[bool] = True
    stats: dict[str, Any]  # section 7


class Failure(msgspec.Struct, omit_defaults=True):
    """Why a request failed: a stable code (section 8) and a message for people."""

    code: str  # stable: section 8
    message: str  # for people; its wording is not stable
    param: str | None = None  # bad_request: the request field it is about, where one is

    def __post_init__(self) -> None:
        assert self.code in ERROR_CODES, self.code


class Error(_Event, tag="error"):
    """The request failed (terminal)."""

    terminal: ClassVar[bool] = True
    error: Failure


Event = Loading | Token | Preempted | Done | Error


def as_map(event: Event) -> dict[str, Any]:
    """The event as the map on the wire, "event" first."""
    return msgspec.to_builtins(event)
