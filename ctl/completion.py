"""Shell completion: the bash and zsh scripts, and the candidates they ask for.

The scripts are thin: they run `llmctl __complete CWORD WORDS...`, which answers from the
argument parser itself (so a new option completes without touching the scripts) and,
for model and policy names, from the daemon. A daemon that is down or slow gives no
names, never an error on the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from importlib import resources

from .client import Client

SCRIPTS = {"bash": "llmctl.bash", "zsh": "_llmctl"}
ASK_TIMEOUT = 2.0  # seconds a TAB may wait for the daemon


def script(shell: str) -> str:
    return resources.files(__package__).joinpath("completions", SCRIPTS[shell]).read_text()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            shown = {a.dest for a in action._choices_actions}  # not the hidden ones
            return {name: p for name, p in action.choices.items() if name in shown}
    return {}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if a.help != argparse.SUPPRESS}


def _names(words: list[str], what: str) -> list[str]:
    """Model or policy names from the daemon at the socket the words name, if it answers."""
    path = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "--socket"), None)
    with contextlib.suppress(Exception), Client(path, timeout=ASK_TIMEOUT) as client:
        if what == "model":
            return [m["name"] for m in client.models()]
        return list(client.call("policy", action="list")["available"])
    return []


def candidates(parser: argparse.ArgumentParser, words: list[str], cword: int,
               names: Callable[[list[str], str], list[str]] = _names) -> list[str]:
    """What may stand at words[cword] (the word being typed, perhaps partly)."""
    words = list(words) + [""] * (cword + 1 - len(words))
    current, before = words[cword], words[1:cword]
    positional = 0
    skip = False
    for i, word in enumerate(before):
        if skip:
            skip = False
            continue
        options = _options(parser)
        if word in options:
            skip = options[word].nargs != 0  # its value is the next word
            if skip and i == len(before) - 1:  # completing that value
                dest = options[word].dest
                return _match(names(words, "model") if dest == "model" else [], current)
            continue
        sub = _subparsers(parser)
        if word in sub:
            parser, positional = sub[word], 0
        elif not word.startswith("-"):
            positional += 1
    if current.startswith("-"):
        return _match(sorted(_options(parser)), current)
    sub = _subparsers(parser)
    if sub:
        return _match(list(sub), current)
    wanted = [a for a in parser._actions if not a.option_strings]
    if positional < len(wanted):
        dest = wanted[positional].dest
        if wanted[positional].choices:
            return _match(list(wanted[positional].choices), current)
        if dest in ("model", "name"):
            return _match(names(words, "model" if dest == "model" else "policy"), current)
    return []


def _match(options: list[str], prefix: str) -> list[str]:
    return [o for o in options if o.startswith(prefix)]


def complete(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """`llmctl __complete CWORD WORDS...`: print the candidates, one a line."""
    try:
        cword, words = int(argv[0]), argv[1:]
    except (IndexError, ValueError):
        return 2
    for candidate in candidates(parser, words, cword):
        print(candidate)
    return 0
