"""One way to declare a value and one check of it, for the config's keys, the ops' fields
and the policies' parameters.

A Param says a value's kind, default, bounds and help once; the docs, the config loader,
the control socket and `llmctl policy` all read it. `Param.check` raises SchemaError with
the facts (which field, which problem, the value); its message is the config file's
wording, and each layer that words its errors otherwise (the ops, the policies) words the
same facts in its own style.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

# kind: not of the declared type; finite: NaN or an infinity, or a number too large for a
# double; range: an integer outside 64 bits; text: a string (anywhere inside) that is not
# Unicode text UTF-8 can carry (a lone surrogate); key: a map key that is no string; choice: not one of
# the declared choices; min, max: below or above a bound (for strings their length, for
# arrays and maps their count); valid: refused by the hook.
Problem = Literal["kind", "finite", "range", "text", "key", "choice", "min", "max", "valid"]
INT64 = 1 << 63  # msgpack's integers, and every C integer llama.cpp takes, fit in 64 bits
SHOWN_CHARS = 60  # a message quotes at most this much of a value

# The config file's wording, and SchemaError's own message.
CONFIG_WORDING: Mapping[Problem, str] = {
    "kind": "{name}: expected {kind}, got {got}",
    "finite": "{name}: expected a finite number, got {value}",
    "range": "{name}: {value} does not fit in a 64-bit integer",
    "text": "{name}: {detail}",
    "key": "{name}: expected string keys, got {got} ({value!r})",
    "choice": "{name}: {value!r} is not one of {choices}",
    "min": "{name}: {value} is below the minimum {limit}",
    "max": "{name}: {value} is above the maximum {limit}",
    "valid": "{name}: {detail}",
}


class SchemaError(ValueError):
    """A value that does not fit its Param; `name` is the field's path (stop[0],
    models.a.adapters.x), `param` the declaration it failed (an item's, for an item)."""

    def __init__(self, name: str, problem: Problem, value: Any, param: Param,
                 detail: str = "") -> None:
        self.name, self.problem, self.value, self.param = name, problem, value, param
        self.detail = detail  # the hook's message, for problem "valid"
        kind = "a table" if param.kind is dict else param.kind.__name__
        super().__init__(self.words(CONFIG_WORDING, kind=kind, got=type(value).__name__))

    def words(self, wording: Mapping[Problem, str], **names: str) -> str:
        """The message in a layer's wording: a template per problem over the facts (name,
        value, limit, detail, choices) and the names the layer gives (kind, got, ...); a
        problem the layer does not word keeps the config's wording."""
        if self.problem not in wording:
            return str(self)
        limit = {"min": self.param.min, "max": self.param.max}.get(self.problem)
        choices = ", ".join(map(repr, self.param.choices or ()))
        return wording[self.problem].format(name=self.name, value=Shown(self.value),
                                            limit=limit, detail=self.detail, choices=choices,
                                            **names)


class Shown:
    """A value as a message quotes it, str() or repr(): short, and printable whatever it is
    (a 1 MB string, a 5,000-digit number, which str() refuses, or an array nested 1,000
    deep must not make the error the problem)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return self._short(str)

    def __repr__(self) -> str:
        return self._short(repr)

    def _short(self, show: Callable[[Any], str]) -> str:
        value = self.value
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= INT64:
            return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"
        try:
            text = show(value)
        except (ValueError, RecursionError):
            return f"a {type(value).__name__}"
        return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def bad_text(value: Any) -> tuple[str, str] | None:
    """Where in value (a suffix of its name: "", "[0].content") a string (map keys too)
    cannot be carried as UTF-8, and why; None if all can. Iterative: a deeply nested value
    must not exhaust the stack."""
    stack = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return where, (f"a lone surrogate (U+{ord(item[exc.start]):04X}) at character "
                               f"{exc.start} is not Unicode text; send UTF-8 (in JSON, a "
                               "\\uD800-\\uDFFF escape must be half of a pair)")
        elif isinstance(item, dict):
            for key, inner in item.items():
                stack.append((where, key))
                stack.append((f"{where}.{_printable(key)}", inner))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", inner) for i, inner in enumerate(item))
    return None


def _printable(key: Any) -> str:
    text = key.encode("utf-8", "backslashreplace").decode() if isinstance(key, str) else repr(key)
    return text[:SHOWN_CHARS]


@dataclass(frozen=True)
class Param:
    """One value, declared once. Positional order is a policy's: kind, default, help, then
    the bounds (third-party policies write Param(float, 1.0, "help", 0, 10))."""

    kind: type  # str, int, float, bool, list or dict; an int passes for a float, a bool never for an int
    default: Any = None  # the config's and the policies' default; ops fields have none
    help: str = ""
    min: float | None = None  # strings: the shortest length; arrays and maps: the fewest items
    max: float | None = None  # strings: the longest length; arrays and maps: the most items
    # What a type and bounds cannot say (a CPU quota's syntax, which roles a message may
    # have): raises ValueError naming the problem.
    valid: Callable[[Any], object] | None = None
    items: Param | None = None  # arrays: each item; maps: each value
    choices: tuple[Any, ...] | None = None
    required: bool = False  # ops: a request must carry the field

    def check(self, name: str, value: Any) -> Any:
        """The value as its kind (an int as a float), or SchemaError naming the field."""
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # JSON's digits can be longer than a double
                raise SchemaError(name, "finite", value, self) from None
        if not isinstance(value, self.kind) or (self.kind is not bool and isinstance(value, bool)):
            raise SchemaError(name, "kind", value, self)
        if isinstance(value, float) and not math.isfinite(value):
            raise SchemaError(name, "finite", value, self)
        if isinstance(value, int) and not -INT64 <= value < INT64:
            raise SchemaError(name, "range", value, self)
        if isinstance(value, str | list | dict) and (bad := bad_text(value)):
            raise SchemaError(name + bad[0], "text", value, self, bad[1])
        if isinstance(value, dict):
            # keys become names (policy parameters, adapters): a binary or numeric key is a
            # shape error
            for key in value:
                if not isinstance(key, str):
                    raise SchemaError(name, "key", key, self)
        if self.choices is not None and value not in self.choices:
            raise SchemaError(name, "choice", value, self)
        size = len(value) if isinstance(value, str | list | dict) else value
        if self.min is not None and size < self.min:
            raise SchemaError(name, "min", value, self)
        if self.max is not None and size > self.max:
            raise SchemaError(name, "max", value, self)
        if self.items is not None:
            value = self._check_items(name, value)
        if self.valid is not None:
            try:
                self.valid(value)
            except ValueError as exc:
                raise SchemaError(name, "valid", value, self, str(exc)) from None
        return value

    def _check_items(self, name: str, value: list | dict) -> list | dict:
        assert self.items is not None
        if isinstance(value, dict):
            return {key: self.items.check(f"{name}.{key}", item) for key, item in value.items()}
        return [self.items.check(f"{name}[{i}]", item) for i, item in enumerate(value)]
