"""llmctl chat: the conversation (..chat) with submit's options but --raw."""

from __future__ import annotations

import argparse

from .. import chat
from ..client import Client
from . import Command
from .submit import add_submit_options, submit_fields


def cmd_chat(client: Client, args: argparse.Namespace) -> int:
    fields = {k: v for k, v in submit_fields(args).items() if k != "model"}
    return chat.run(client, args.model, args.messages, fields)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH",
                        help="daemon socket (as for the other commands)")
    add_submit_options(parser, skip=("raw",))


COMMAND = Command(
    "chat", help="talk with a model: multi-turn, streamed, on a terminal",
    description="An interactive conversation with a model, like `ollama run`: each question "
    "is sent with the conversation so far (rendered with the model's chat template) and "
    "the answer streams. Ctrl-C cancels an answer and leaves that question out of the "
    "conversation; Ctrl-D or /bye leaves; /clear forgets the conversation; /system TEXT "
    "sets the system prompt; /? lists the commands. With standard input not a terminal, "
    "all of it is one question: the answer is printed and llmctl exits. No --json: for "
    "scripts, use submit --system.",
    run=cmd_chat, arguments=_arguments, common=False, raw=True, epilog=True)
