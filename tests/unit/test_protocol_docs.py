"""docs/protocol.md is current: its generated blocks match the ops, and its prose the code."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import pytest
from llm_residentd.front import ops
from llm_residentd.front.ops import docs
from llm_residentd.placement.limits import Limits
from llm_residentd.wire.protocol import ERROR_CODES, decode

PAGE = Path(__file__).parents[2] / "docs" / "protocol.md"


def test_docs_protocol_md_is_generated_from_the_ops():
    text = PAGE.read_text()
    assert docs.rewrite(text) == text, (
        "docs/protocol.md is stale: python -m llm_residentd.front.ops.docs")


def test_the_check_finds_the_page_without_a_path():
    """`python -m llm_residentd.front.ops.docs --check` as the docs tell it."""
    assert PAGE.resolve() == docs.PAGE and docs.main(["--check"]) == 0


def test_every_op_has_a_field_table_and_a_row_in_the_ops_table():
    text = PAGE.read_text()
    for name, op in ops.OPS.items():
        assert f"<!-- generated: fields {name} (" in text
        assert f"| `{name}` | {docs.summary(op)} | {docs.access(op)} |" in text
    assert "| `prompt` | string | no | at least 1 character | the prompt text; exactly one " \
        "of prompt and messages |" in text


def _page(*blocks: str) -> str:
    return "".join(f"prose before {b}\n<!-- generated: {b} ({docs.COMMAND}) -->\nstale\n"
                   "<!-- end generated -->\nprose after\n" for b in blocks)


def test_the_generator_rewrites_only_its_blocks():
    names = list(docs.blocks())
    new = docs.rewrite(_page(*names))
    assert "stale" not in new and new.count("prose before") == len(names)
    assert docs.rewrite(new) == new
    assert docs.fields_table(ops.OPS["events"]) in new and docs.error_codes_table() in new


@pytest.mark.parametrize("change, words", [
    (lambda names: names[1:], "missing ['ops']"),
    (lambda names: [*names, "fields frobnicate"], "unknown ['fields frobnicate']"),
    (lambda names: [*names, names[0]], "repeated ['ops']"),
])
def test_the_generator_refuses_a_page_whose_blocks_do_not_match_the_ops(change, words):
    names = sorted(docs.blocks(), key=lambda n: n != "ops")  # ops first
    with pytest.raises(docs.StaleMarkers, match=re.escape(words)):
        docs.rewrite(_page(*change(names)))


def test_check_mode_exit_codes(tmp_path, capsys):
    page = tmp_path / "protocol.md"
    page.write_text(_page(*docs.blocks()))
    assert docs.main(["--check", str(page)]) == 1
    assert docs.main([str(page)]) == 0 and "stale" not in page.read_text()
    assert docs.main(["--check", str(page)]) == 0


def test_section_8_says_when_each_code_is_sent():
    """The hand-written table of section 8 covers exactly the declared codes."""
    text = PAGE.read_text()
    section = text[text.index("## 8. Error codes"):text.index("## 9. Limits")]
    when = section[section.index("| code | as | when | connection |"):]
    codes = {line.split("`")[1] for line in when.splitlines() if line.startswith("| `")}
    assert codes == set(ERROR_CODES), (codes ^ set(ERROR_CODES))


def test_a_repeated_key_takes_its_last_value_at_any_depth():
    """protocol.md section 2: what the daemon's decoder does with a key sent twice."""
    def pairs(*kv: object) -> bytes:
        return bytes([0x80 | len(kv) // 2]) + b"".join(
            x if isinstance(x, bytes) and x[:1] in (b"\x81", b"\x82") else msgpack.packb(x)
            for x in kv)
    inner = pairs("cpu", "10%", "cpu", "50%")
    assert decode(pairs("op", "hello", "protocol", 2, "protocol", 1, "settings", inner)) == {
        "op": "hello", "protocol": 1, "settings": {"cpu": "50%"}}


def test_limits_reply_tasks_max_is_an_integer_or_max():
    """protocol.md section 5.6: the request's 0 comes back as "max", a limit as an int."""
    assert Limits().describe()["tasks_max"] == "max"
    assert Limits(tasks_max=64).describe()["tasks_max"] == 64
    assert "| `tasks_max` | integer or string |" in PAGE.read_text()


def test_submit_defaults_in_the_prose_match_the_code():
    """Param declares no default; section 5.2's table of defaults must follow the code."""
    from llm_residentd.front.ops.submit import SAMPLING_DEFAULTS
    text = PAGE.read_text()
    table = text[text.index("| field | default when omitted | details |"):]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells[1]
    assert list(rows) == list(ops.OPS["submit"].params)
    for key, value in SAMPLING_DEFAULTS.items():
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        assert rows[key] == f"`{shown}`", (key, rows[key], value)


def test_section_14_lists_every_worker_message_from_messages_py():
    """Issue 14: the daemon<->worker messages are generated from daemon/wire/messages.py, with
    each field's type, default and comment; a changed message makes the page stale."""
    import typing

    import msgspec
    from llm_residentd.wire import messages

    text = PAGE.read_text()
    section = text[text.index("## 14. Worker messages"):]
    for union in (messages.ToWorker, messages.FromWorker):
        for cls in typing.get_args(union):
            assert f"#### `{cls.__struct_config__.tag}`\n" in section, cls
    assert "| `parallel` | `int` | `1` | sequences decoded together (slots) |" in section
    assert "| `cells` | `dict[str, int]` | `{}` | request -> KV cells its sequence holds now |" \
        in section
    assert "| `state` | `bytes \\| None` | `null` |" in section

    class Probe(msgspec.Struct, tag="probe", kw_only=True):
        """A new message."""

        n: int = 3  # how many
    assert docs.message_table(Probe).splitlines()[-1] == "| `n` | `int` | `3` | how many |"
