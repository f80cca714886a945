"""llmctl policy: list, show or change the resource policies."""

from __future__ import annotations

import argparse
from typing import Any

from ..client import Client
from ..output import show, table
from . import EXIT_OK, Command, common_options
from .params import key_value

ACTIONS = {"show": "its manual and parameters",
           "set": "change parameters (root); enabled=false disables",
           "enable": "switch it on with its current settings (root)",
           "disable": "switch it off; what it set stays (root)"}


def cmd_policy(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        reply = client.call("policy", action="list")
    elif args.action in ("set", "enable"):
        settings = dict(args.settings) if args.action == "set" else {}
        reply = client.call("policy", action="set", name=args.name, settings=settings)
    else:
        reply = client.call("policy", action=args.action, name=args.name)
    show(args, reply, _listed if args.action == "list" else
         _shown if args.action == "show" else _changed)
    return EXIT_OK


def _listed(reply: dict[str, Any]) -> str:
    rows = [[n, "enabled" if n in reply["enabled"] else
             "DISABLED" if n in reply["disabled"] else "-",
             " ".join(f"{k}={v}" for k, v in reply["enabled"].get(n, {}).items())]
            for n in reply["available"]]
    return "\n".join([table(["POLICY", "STATE", "SETTINGS"], rows),
                      *(f"\n{name}: {why.strip()}"
                        for name, why in {**reply["disabled"], **reply["load_errors"]}.items())])


def _shown(reply: dict[str, Any]) -> str:
    return "\n".join([reply["doc"].strip() if reply["doc"] else reply["name"], "",
                      table(["PARAMETER", "TYPE", "DEFAULT", "MIN", "MAX", "CURRENT", "MEANING"],
                            [[k, p["type"], p["default"], p["min"], p["max"],
                              (reply["settings"] or {}).get(k), p["help"]]
                             for k, p in reply["params"].items()])])


def _changed(reply: dict[str, Any]) -> str:
    if "disabled" in reply:  # disable, or set enabled=false
        return f"{reply['name']}: {reply['disabled']}"
    return f"{reply['name']}: " + " ".join(f"{k}={v}" for k, v in reply["settings"].items())


def _arguments(parser: argparse.ArgumentParser) -> None:
    nested = common_options(nested=True)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", parents=[nested], help="every policy and its state")
    for action, what in ACTIONS.items():
        a = actions.add_parser(action, parents=[nested], help=what, description=what)
        a.add_argument("name", metavar="NAME", help="the policy (llmctl policy list)")
        if action == "set":
            a.add_argument("settings", nargs="+", metavar="KEY=VALUE", type=key_value)


COMMAND = Command(
    "policy", help="list, show or change the resource policies",
    description="list: every policy and whether it is enabled. show NAME: its manual and "
    "parameters. set NAME key=value...: change parameters live, enabling the policy if it "
    "was off; enabled=false disables it (root only). enable NAME, disable NAME: switch it "
    "on or off (root only; what it set stays).", run=cmd_policy, arguments=_arguments,
    raw=True)
