"""The one checker behind the config's keys, the ops' fields and the policies' parameters."""

from __future__ import annotations

import pytest
from llm_residentd.wire.schema import Param, SchemaError


def _error(param: Param, value: object, name: str = "x") -> SchemaError:
    with pytest.raises(SchemaError) as err:
        param.check(name, value)
    return err.value


def test_an_int_passes_for_a_float_and_a_bool_never_for_a_number():
    assert Param(float).check("x", 3) == 3.0 and isinstance(Param(float).check("x", 3), float)
    assert Param(bool).check("x", True) is True
    for kind in (int, float):
        err = _error(Param(kind), True)
        assert (err.problem, err.value, err.param.kind) == ("kind", True, kind)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_numbers_are_finite_before_they_are_bounded(value):
    err = _error(Param(float, min=0, max=1), value)
    assert err.problem == "finite" and str(err).startswith("x: expected a finite number")


@pytest.mark.parametrize("param, value, problem, message", [
    (Param(int, min=1), 0, "min", "n: 0 is below the minimum 1"),
    (Param(int, max=64), 65, "max", "n: 65 is above the maximum 64"),
    (Param(str, min=1), "", "min", "n:  is below the minimum 1"),  # a string's length
    (Param(list, max=1), [1, 2], "max", "n: [1, 2] is above the maximum 1"),  # its items
    (Param(str, choices=("a", "b")), "c", "choice", "n: 'c' is not one of 'a', 'b'"),
    (Param(dict), {"a": "v", 1: "v"}, "key", "n: expected string keys, got int (1)"),
    (Param(dict), [], "kind", "n: expected a table, got list"),
])
def test_each_problem_is_a_fact_and_a_message_naming_the_field(param, value, problem, message):
    err = _error(param, value, "n")
    assert (err.name, err.problem, err.param) == ("n", problem, param)
    assert err.value == (1 if problem == "key" else value)  # the key that is no string
    assert str(err) == message


def test_items_of_arrays_and_maps_are_checked_under_their_path():
    items = Param(list, items=Param(str, min=1))
    assert items.check("stop", ["a", "b"]) == ["a", "b"]
    err = _error(items, ["a", ""], "stop")
    assert err.name == "stop[1]" and err.param is items.items
    table = Param(dict, items=Param(str))
    assert table.check("adapters", {"a": "x.gguf"}) == {"a": "x.gguf"}
    assert str(_error(table, {"a": 3}, "adapters")) == "adapters.a: expected str, got int"


def test_the_hook_sees_the_checked_value_and_its_message_is_kept():
    def even(value: int) -> None:
        if value % 2:
            raise ValueError(f"{value} is odd")

    param = Param(float, valid=lambda v: None if isinstance(v, float) else 1 / 0)
    assert param.check("x", 2) == 2.0  # the hook got the float
    err = _error(Param(int, valid=even), 3)
    assert (err.problem, err.detail, str(err)) == ("valid", "3 is odd", "x: 3 is odd")


def test_a_policy_declares_positionally_kind_default_help_then_bounds():
    p = Param(float, 20.0, "tokens forgiven per second", 0.0, 1e6)
    assert (p.kind, p.default, p.help, p.min, p.max, p.required) == (
        float, 20.0, "tokens forgiven per second", 0.0, 1e6, False)
