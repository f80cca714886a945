"""policy: list the policies, show one, or change one live (changes: root only).

Access: any peer may `list` and `show`; `set` and `disable` need root (uid 0), others
get `forbidden`.

Request: {"op": "policy", "action": "list"}
Reply:   {"available": {NAME: MODULE}, "enabled": {NAME: {PARAM: VALUE}},
          "disabled": {NAME: WHY}, "load_errors": {NAME: TRACEBACK}, "deferred": [IDS]}
Request: {"op": "policy", "action": "show", "name": "psi-admission"}
Reply:   {"name", "enabled": bool, "settings": {...}, "params": {PARAM: {"type", "default",
          "min", "max", "help"}}, "doc": "..."}
Request: {"op": "policy", "action": "set", "name": "psi-admission",
          "settings": {"defer_above": "50"}}
Reply:   {"name", "settings": {...}}  (enables the policy if it was not)
Request: {"op": "policy", "action": "disable", "name": "threads"}
Reply:   {"name", "disabled": "WHY"}  (what it did stays; set enables it again)
In set, the key "enabled" is the switch, as in a [[policies]] table of the config:
{"enabled": false} (alone) is disable, {"enabled": true, ...} enables with the rest.

Checks, in this order: the fields' shapes (action one of the four, a name where needed,
settings a map with string keys); then authorization: set and disable need root (a
non-root peer gets forbidden whatever the values); then what needs the daemon: the
policy exists, every setting is a parameter of it and its value passes that parameter's
declaration (type, range, and for values like a CPU quota their syntax). Any failure is
bad_request and changes nothing: the policy stays enabled or disabled as it was, with
its old settings.
"""

from __future__ import annotations

from typing import Any

from ...policies import PolicyError
from ...policies.base import check_setting
from ...wire.protocol import ProtocolError
from ...wire.schema import Shown
from .base import Context, Op, Param, register

ACTIONS = ("list", "show", "set", "disable")
ENABLED = Param(bool, True, "false disables the policy, true enables it")


@register
class PolicyOp(Op):
    name = "policy"
    params = {
        "action": Param(str, help="list, show, set or disable", required=True, max=16),
        "name": Param(str, help="the policy, for show, set and disable", max=200),
        "settings": Param(dict, help="parameters to change, for set (values may be strings; "
                          "\"enabled\" switches the policy)"),
    }

    def execute(self, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        engine, action, name = ctx.service.engine, args["action"], args.get("name")
        if action not in ACTIONS:
            raise ProtocolError("bad_request",
                                f"action must be list, show, set or disable, not {Shown(action)!r}")
        if action == "list":
            return engine.describe()
        if not name:
            raise ProtocolError("bad_request", f"policy {action} needs a name")
        if action != "show" and ctx.uid != 0:
            raise ProtocolError("forbidden", f"changing policies needs root; this peer is "
                                f"uid {ctx.uid}")
        cls = engine.classes.get(name)
        if cls is None:
            raise ProtocolError("bad_request", f"no policy {Shown(name)!r} "
                                f"(available: {', '.join(sorted(engine.classes))})")
        if action == "show":
            policy = engine.enabled.get(name)
            return {"name": name, "enabled": policy is not None,
                    "settings": policy.settings if policy else None,
                    "disabled": engine.disabled.get(name), "doc": cls.__module__ and
                    __import__(cls.__module__, fromlist=["_"]).__doc__,
                    "params": {k: {"type": p.kind.__name__, "default": p.default, "min": p.min,
                                   "max": p.max, "help": p.help} for k, p in cls.params.items()}}
        try:
            settings = dict(args.get("settings") or {})
            enabled = check_setting(ENABLED, "enabled", settings.pop("enabled", True))
            if action == "disable" or not enabled:
                if settings:
                    raise PolicyError(f"enabled=false disables {name}; it takes no other "
                                      f"settings (got {', '.join(sorted(settings))})")
                how = "disable" if action == "disable" else "set with enabled=false"
                engine.disable(name, f"disabled by uid {ctx.uid} (policy {how})")
                return {"name": name, "disabled": engine.disabled[name]}
            return {"name": name, "settings": engine.configure(name, settings)}
        except PolicyError as exc:
            raise ProtocolError("bad_request", str(exc)) from None
