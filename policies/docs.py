"""Render docs/policies.md from the policies' docstrings and parameter declarations.

    python -m llm_residentd.policies.docs > docs/policies.md
"""

from __future__ import annotations

import importlib

import msgspec

from . import available
from .base import ACTIONS, EVENTS

INTRO = '''# Policies

A policy decides how the daemon reacts to pressure and load. It receives events (a tick
every second, a PSI trigger on the system or a worker's scope, a request queued, started
or finished or preempted) with a read-only snapshot (PSI averages and totals of the
system, of the rest of the machine outside the workers' cgroups, and of each scope;
cgroup memory; each worker's slots, busy slots and batch limit; the waiting and running
requests, with the KV cells each running sequence holds), and returns
actions: admit, defer or rank a waiting request, preempt a running one, set a model's
limits, set a worker's threads, trim or shrink a worker's KV cache, or limit how many of
a worker's or a model's slots dispatch fills (`set_batch`: each worker runs up to
`parallel` requests at once, one sequence each in its batch). The daemon applies
them and records each one (`llmctl events`); a worker's answer to a KV change is
recorded too, with its token counts, RSS before and after, and time taken.

Enable policies in the config, one `[[policies]]` table each, or live with
`llmctl policy set NAME key=value...` (root). `llmctl policy show NAME` prints the manual
and parameters below. A policy that raises or returns garbage is switched off and logged
(`llmctl policy list` shows why); the daemon keeps serving with the others.

Third-party policies load the same way as the built-ins: a class deriving
`llm_residentd.policies.Policy`, registered under the entry-point group
`llm_residentd.policies` with the policy's name:

```ini
[options.entry_points]
llm_residentd.policies =
    my-policy = my_package.my_policy:MyPolicy
```

Its `on_event` returns a list of the actions below, each a type to import from
`llm_residentd.policies`, and the event it is given is one of the events below (its
`kind` is the name a policy's `events` set lists):

```python
from llm_residentd.policies import Action, Admit, Defer, Event, Param, Policy, Snapshot


class MyPolicy(Policy):
    """my-policy: hold new requests back while `hold` is true."""

    name = "my-policy"
    events = frozenset({"queued", "tick"})
    params = {"hold": Param(bool, True, "keep new requests back")}

    def on_event(self, event: Event, snap: Snapshot) -> list[Action]:
        action = Defer if self.settings["hold"] else Admit
        return [action(r.id, reason="hold is set") for r in snap.queued]
```

The first field of an action names what it acts on; each also takes `reason=`, recorded
with it. The daemon checks every value against these declarations: a policy that returns
anything else is switched off with a message naming the value.

{actions}

{events}

Status: every policy below has deterministic tests (fake clock, scripted snapshots).
`static`, `sjf`, `priority` (preemption with restore and with recompute) and admission
gating also run in the daemon's integration tests, and the worker's KV trim and shrink are
tested over its real IPC. Measurements under load in the systemd guest are in
docs/benchmarks.md.

This page is generated: `python -m llm_residentd.policies.docs > docs/policies.md`.
'''


def _type(t: msgspec.inspect.Type) -> str:
    """int 1 to 1024, str, float; X | None as X (the default shows it is optional)."""
    if isinstance(t, msgspec.inspect.UnionType):
        return " or ".join(_type(u) for u in t.types if not isinstance(u, msgspec.inspect.NoneType))
    name = type(t).__name__.removesuffix("Type").lower()
    low = getattr(t, "ge", None)
    return name if low is None else f"{name} {low} to {t.le}"


def _field(f: msgspec.inspect.Field) -> str:
    default = "" if f.required else ", optional" if f.default is None else f", default {f.default}"
    return f"`{f.name}` {_type(f.type)}{default}"


def _table(head: str, classes: tuple[type[msgspec.Struct], ...], skip: int) -> str:
    """One row per declared type: how to build it, its kind (as `llmctl events` and a
    policy's `events` name it), its fields after the first `skip` with their types and
    ranges, and its docstring."""
    rows = [f"| {head} | kind | {'values' if skip else 'fields'} | meaning |", "|---|---|---|---|"]
    for cls in classes:
        info = msgspec.inspect.type_info(cls)
        fields = [f for f in info.fields if f.name != "reason"]
        build = ", ".join(f.name for f in fields if f.required)
        doc = " ".join((cls.__doc__ or "").split())
        rows.append(f"| `{cls.__name__}({build})` | `{info.tag}` | "
                    f"{'; '.join(_field(f) for f in fields[skip:])} | {doc} |")
    return "\n".join(rows)


def render() -> str:
    parts = [INTRO.replace("{actions}", _table("action", ACTIONS, skip=1))  # skip the target
             .replace("{events}", _table("event", EVENTS, skip=0))]
    for name, cls in sorted(available()[0].items()):
        doc = (importlib.import_module(cls.__module__).__doc__ or name).strip()
        title, _, body = doc.partition("\n")
        summary = title.split(": ", 1)[-1]
        rows = ["| parameter | type | default | range | meaning |", "|---|---|---|---|---|"]
        for key, p in cls.params.items():
            rng = "" if p.min is None else f"{p.min:g} to {p.max:g}"
            rows.append(f"| `{key}` | {p.kind.__name__} | `{p.default}` | {rng} | {p.help} |")
        parts.append(f"## {name}\n\n{summary[:1].upper()}{summary[1:]}\n\n{body.strip()}\n\n"
                     + "\n".join(rows) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
