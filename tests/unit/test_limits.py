from __future__ import annotations

import pytest
from llm_residentd.placement.limits import (
    LimitError,
    Limits,
    check_order,
    cpu_max_line,
    format_bytes,
    format_cpu,
    parse_bytes,
    parse_cpu,
)


@pytest.mark.parametrize("text, cpus", [("50%", 0.5), ("150%", 1.5), ("1.5", 1.5), ("max", None),
                                        ("1%", 0.01), (" 25 % ".replace(" ", ""), 0.25)])
def test_parse_cpu(text, cpus):
    assert parse_cpu(text, ncpu=2) == cpus


@pytest.mark.parametrize("text, words", [("0%", "between 1%"), ("abc", "percentage"),
                                         ("300%", "200%"), ("-1", "between")])
def test_parse_cpu_errors(text, words):
    with pytest.raises(LimitError, match=words):
        parse_cpu(text, ncpu=2)


def test_parse_bytes():
    assert parse_bytes("600M", "m") == 600 << 20
    assert parse_bytes("1G", "m") == 1 << 30
    assert parse_bytes("2GiB", "m") == 2 << 30
    assert parse_bytes("max", "m") is None
    assert parse_bytes(str((20 << 20) + 5), "m") == 20 << 20  # rounded down to 4 KiB
    for bad, words in (("1K", "at least 16M"), ("lots", "a size like")):
        with pytest.raises(LimitError, match=words):
            parse_bytes(bad, "memory_high")


def test_formatting_and_cpu_max():
    assert format_cpu(0.5) == "50%" and format_cpu(None) == "max"
    assert format_bytes(600 << 20) == "600M" and format_bytes(None) == "max"
    assert cpu_max_line(0.5) == "50000 100000" and cpu_max_line(None) == "max 100000"


def test_merge_and_order():
    base = Limits(cpu=1.0, memory_high=1 << 30)
    assert base.merged(cpu=0.5, memory_high=...).memory_high == 1 << 30
    assert base.merged(cpu=None).cpu is None
    with pytest.raises(LimitError, match="above memory_max"):
        check_order(Limits(memory_high=2 << 30, memory_max=1 << 30))
