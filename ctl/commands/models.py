"""llmctl models: list the configured models; add or remove one at run time (root)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from ..client import Client
from ..output import show, table
from . import EXIT_OK, RAW, Command, common_options
from .params import key_value

# `models add` options that are model keys of their own (the rest go through --set).
MODEL_OPTIONS = {
    "n_ctx": ("N", "context tokens of one request"),
    "parallel": ("N", "requests one worker decodes together"),
    "workers": ("N", "worker processes"),
    "threads": ("N", "threads per worker; 0 follows the CPUs"),
    "keep_alive": ("D", "how long it stays loaded while idle: 5m, 30s, 0, -1"),
    "load": ("WHEN", "auto, at_start or on_demand"),
}
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def model_option(text: str) -> tuple[str, Any]:
    """argparse type of --set KEY=VALUE: VALUE as the type of the [models.NAME] key (an
    unknown key is sent as text: the daemon's answer names the keys it knows)."""
    from llm_residentd.catalog.config import ModelConfig

    key, value = key_value(text)
    kind = {f.name: f.type for f in dataclasses.fields(ModelConfig)}.get(key, "str")
    try:
        if kind == "bool":
            return key, _BOOLS[value.lower()]
        return key, {"int": int, "float": float}.get(kind, str)(value)
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not {kind}") from None


class _ModelOption(argparse.Action):
    """`models add` options into one map of [models.NAME] keys; a key given twice (by its
    option and by --set) is a usage error."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        key, value = values if self.const is None else (self.const, values)
        options = dict(getattr(namespace, self.dest) or {})
        if key in options:
            raise argparse.ArgumentError(self, f"{key} is given twice")
        options[key] = value
        setattr(namespace, self.dest, options)


def cmd_models(client: Client, args: argparse.Namespace) -> int:
    if args.action == "add":
        # The daemon's working directory is not ours: send the path absolute.
        show(args, client.call("add_model", name=args.new_model,
                               path=os.path.abspath(args.path), options=args.options or {}),
             _added)
    elif args.action == "remove":
        show(args, client.call("remove_model", name=args.model), _removed)
    else:
        show(args, client.models(), _listed)
    return EXIT_OK


def _listed(models: list[dict[str, Any]]) -> str:
    lines = [table(["MODEL", "STATE", "WORKERS", "N_CTX", "SOURCE"],
                   [[m["name"], m["state"], m["workers"], m["n_ctx"], m["source"]]
                    for m in models])]
    for m in models:
        if m["error"]:
            lines.append(f"\n{m['name']}: {m['error']}")
        for name, adapter in m.get("adapters", {}).items():  # an older daemon has none
            state = f"failed: {adapter['error']}" if adapter["error"] else adapter["path"]
            lines.append(f"{m['name']} adapter {name}: {state}")
    return "\n".join(lines)


def _added(reply: dict[str, Any]) -> str:
    m = reply["model"]
    return (f"added {m['name']}: {m['state']}, {m['workers']} worker(s), n_ctx {m['n_ctx']} "
            f"({m['source']})")


def _removed(reply: dict[str, Any]) -> str:
    n = reply["requests"]
    return f"removed {reply['model']}" + (f" ({n} request{'s' * (n != 1)} finishing first)"
                                          if n else "")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(action=None)
    nested = common_options(nested=True)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    a = actions.add_parser("add", parents=[nested], formatter_class=RAW,
                           help="serve one more model (root)",
                           description="Add model NAME from the GGUF file FILE without a "
                           "restart (root only). The options are keys of a [models.NAME] "
                           "table (docs/configuration.md), checked as the config file's: "
                           "--set KEY=VALUE gives any of them. FILE must be readable by the "
                           "workers' user (daemon.worker_user).")
    a.add_argument("new_model", metavar="NAME", help="the new model's name")
    a.add_argument("--path", required=True, metavar="FILE", help="its GGUF file")
    for key, (metavar, what) in MODEL_OPTIONS.items():
        a.add_argument(f"--{key.replace('_', '-')}", dest="options", action=_ModelOption,
                       const=key, type=int if metavar == "N" else str, metavar=metavar,
                       help=what)
    a.add_argument("--set", dest="options", action=_ModelOption, type=model_option,
                   metavar="KEY=VALUE", help="any other key of [models.NAME]; repeat for more")
    a = actions.add_parser("remove", parents=[nested], help="stop serving a model (root)",
                           description="Remove model NAME without a restart (root only): "
                           "it takes no new request, its queued and running requests "
                           "finish, then its workers stop.")
    a.add_argument("model", metavar="NAME", help="the model (llmctl models)")


COMMAND = Command(
    "models", help="list the models; add or remove one (root)",
    description="Without ACTION: list the configured models and whether they can serve. "
    "add NAME --path FILE: serve one more model (root only); remove NAME: stop serving "
    "one, its requests finish first (root only). Both last until the daemon restarts; a "
    "reload of the config file keeps them.", run=cmd_models, arguments=_arguments, raw=True)
