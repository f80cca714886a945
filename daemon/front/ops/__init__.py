"""Ops of the control socket: one module each, registered by name.

An op declares its parameters once (type, bounds, help); `validate` checks a request
against them and `dispatch` runs the op. Its docstring is its spec in docs/protocol.md.
base.py holds that contract; importing this package registers every op.
"""

from . import (  # noqa: F401  (each registers itself)
    add_model,
    cancel,
    events,
    hello,
    limits,
    load,
    models,
    policy,
    ps,
    remove_model,
    status,
    submit,
    unload,
)
from .base import OPS, Context, Op, Param, check_field, lookup, register, validate

__all__ = ["OPS", "Context", "Op", "Param", "check_field", "lookup", "register", "validate"]
