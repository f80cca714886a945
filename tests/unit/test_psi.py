from __future__ import annotations

import os

import pytest
from llm_residentd.control import cgroupstats, psi

SAMPLE = """some avg10=1.50 avg60=0.75 avg300=0.10 total=123456
full avg10=0.00 avg60=0.00 avg300=0.00 total=0
"""


def test_parse():
    p = psi.parse(SAMPLE)
    assert p["some"] == {"avg10": 1.5, "avg60": 0.75, "avg300": 0.1, "total": 123456}
    assert p["full"]["total"] == 0


@pytest.mark.parametrize("trigger, privileged, words", [
    (psi.Trigger("half", 1000, 1_000_000), True, "some or full"),
    (psi.Trigger("some", 1000, 100_000), True, "outside"),
    (psi.Trigger("some", 2_000_000, 1_000_000), True, "within the window"),
    (psi.Trigger("some", 100_000, 1_000_000), False, "multiple of 2 s"),
])
def test_trigger_checks(trigger, privileged, words):
    with pytest.raises(ValueError, match=words):
        trigger.check(privileged)


def test_trigger_line_and_valid_unprivileged():
    t = psi.Trigger("full", 150_000, 2_000_000)
    t.check(privileged=False)
    assert t.line() == b"full 150000 2000000"


def test_missing_pressure_file_is_a_clear_error(tmp_path):
    with pytest.raises(psi.PsiUnavailable, match="does not exist"):
        psi.open_trigger(tmp_path / "cpu.pressure", psi.Trigger("some", 100_000, 1_000_000))


def test_cgroup_stats_from_files(tmp_path):
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    (tmp_path / "memory.high").write_text("629145600\n")
    (tmp_path / "memory.current").write_text("1048576\n")
    (tmp_path / "cpu.stat").write_text("usage_usec 10\nnr_throttled 3\nthrottled_usec 900\n")
    (tmp_path / "memory.events").write_text("low 0\nhigh 7\nmax 0\noom 0\noom_kill 0\n")
    (tmp_path / "cpu.pressure").write_text(SAMPLE)
    st = cgroupstats.read(tmp_path)
    assert st["cpu.max"] == "50000 100000" and st["memory.high"] == "629145600"
    assert st["memory.current"] == 1 << 20 and st["memory.max"] is None
    assert st["cpu.stat"]["throttled_usec"] == 900 and st["memory.events"]["high"] == 7
    assert st["pressure"]["cpu"]["some"]["avg10"] == 1.5 and st["pressure"]["io"] is None


def _fields(text: str) -> dict[str, dict[str, str]]:
    """The raw words of a pressure file: {"some": {"avg10": "1.50", ...}, "full": ...}."""
    return {kind: dict(f.split("=") for f in rest.split())
            for kind, _, rest in (line.partition(" ") for line in text.splitlines())}


def _avgs(files: dict[str, dict[str, dict[str, str]]]) -> dict:
    return {(r, kind, f): v for r, kinds in files.items() for kind, words in kinds.items()
            for f, v in words.items() if f != "total"}


def test_system_pressure_on_this_machine():
    """Each parsed value matches /proc/pressure read just before and just after it.

    The avg fields change every 2 s: a parse between two equal readings must equal them.
    The totals only grow: the parsed one lies between the two readings.
    """
    if not os.path.exists("/proc/pressure/cpu"):
        pytest.fail("this kernel has no /proc/pressure; CI machines do")
    for _ in range(20):  # an avg update fell between the readings: read again
        before = {r: _fields((psi.SYSTEM / r).read_text()) for r in psi.RESOURCES}
        parsed = psi.system_pressure()
        after = {r: _fields((psi.SYSTEM / r).read_text()) for r in psi.RESOURCES}
        if _avgs(before) == _avgs(after):
            break
    else:
        pytest.fail("the avg fields changed between every pair of readings")
    for res in psi.RESOURCES:
        assert parsed[res] is not None and set(parsed[res]) == set(before[res]), res
        for kind, words in before[res].items():
            got = parsed[res][kind]
            assert set(got) == set(words), (res, kind)
            for field in ("avg10", "avg60", "avg300"):
                assert got[field] == float(words[field]), (res, kind, field)
            lo, hi = int(words["total"]), int(after[res][kind]["total"])
            assert lo <= got["total"] <= hi, (res, kind, lo, got["total"], hi)


def test_parse_a_captured_line_exactly():
    line = ("some avg10=89.96 avg60=34.32 avg300=9.47 total=2754144755\n"
            "full avg10=0.00 avg60=0.08 avg300=0.14 total=18470010\n")
    assert psi.parse(line) == {
        "some": {"avg10": 89.96, "avg60": 34.32, "avg300": 9.47, "total": 2754144755},
        "full": {"avg10": 0.0, "avg60": 0.08, "avg300": 0.14, "total": 18470010}}


def _cgroup(path, cpu_avg10: float):
    path.mkdir(parents=True)
    (path / "cgroup.procs").write_text("")
    (path / "cpu.pressure").write_text(
        f"some avg10={cpu_avg10:.2f} avg60=0.00 avg300=0.00 total=7\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    return path


def test_outside_pressure_is_the_worst_top_level_cgroup_without_workers(tmp_path):
    worker = _cgroup(tmp_path / "llm.slice" / "llm-m-0.scope", 0)
    (tmp_path / "llm.slice" / "cgroup.procs").write_text("")
    (tmp_path / "llm.slice" / "cpu.pressure").write_text("some avg10=90.00 avg60=0 avg300=0 total=1\n")
    _cgroup(tmp_path / "system.slice", 12.5)
    _cgroup(tmp_path / "user.slice", 41.0)
    own = _cgroup(tmp_path / "daemon", 99.0)  # the daemon's own leaf (cgroupfs backend)
    (tmp_path / "not-a-cgroup").mkdir()
    out = cgroupstats.outside_pressure([worker], own, root=tmp_path)
    assert out["cpu"]["some"]["avg10"] == 41.0
    assert "memory" not in out  # no such file anywhere
    assert cgroupstats.outside_pressure([worker], own, root=tmp_path / "missing") == {}
