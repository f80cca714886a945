from __future__ import annotations

import pytest
from llm_residentd.front import ops
from llm_residentd.wire.protocol import ProtocolError


def _err(fn, *args):
    with pytest.raises(ProtocolError) as err:
        fn(*args)
    return err.value


def test_registry_holds_every_op_with_a_docstring_spec():
    assert set(ops.OPS) == {"hello", "submit", "cancel", "status", "models", "limits", "policy",
                            "events", "load", "unload", "ps", "add_model", "remove_model"}
    for op in ops.OPS.values():
        module_doc = __import__(type(op).__module__, fromlist=["x"]).__doc__
        assert module_doc and "Request:" in module_doc and "Reply:" in module_doc


def test_lookup():
    assert _err(ops.lookup, "nope").code == "unknown_op"
    assert _err(ops.lookup, None).code == "bad_request"


def test_validate_types_bounds_and_unknown_fields():
    submit = ops.OPS["submit"]
    args = ops.validate(submit, {"id": 1, "op": "submit", "prompt": "hi", "temperature": 1})
    assert args == {"prompt": "hi", "temperature": 1.0}
    assert "no field 'zz'" in _err(ops.validate, submit, {"prompt": "x", "zz": 1}).message
    assert "needs field 'protocol'" in _err(ops.validate, ops.OPS["hello"], {}).message
    assert "must be a boolean" in _err(ops.validate, submit, {"prompt": "x", "raw": 1}).message
    assert "must be an integer" in _err(ops.validate, submit,
                                       {"prompt": "x", "max_tokens": 1.5}).message
    assert "at most 1" in _err(ops.validate, submit, {"prompt": "x", "top_p": 2}).message
    assert "length of prompt" in _err(ops.validate, submit, {"prompt": ""}).message


def test_non_finite_numbers_and_wire_type_names():
    submit = ops.OPS["submit"]
    for bad in (float("nan"), float("inf")):
        assert "finite" in _err(ops.validate, submit, {"prompt": "x", "timeout": bad}).message
    assert "not nil" in _err(ops.validate, submit, {"prompt": None}).message
    assert "not binary" in _err(ops.validate, submit, {"prompt": b"x"}).message
