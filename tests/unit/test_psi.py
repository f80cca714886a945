from __future__ import annotations

import os

import pytest
from llm_residentd import cgroupstats, psi

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


def test_system_pressure_on_this_machine():
    if not os.path.exists("/proc/pressure/cpu"):
        pytest.fail("this kernel has no /proc/pressure; CI machines do")
    assert psi.system_pressure()["cpu"]["some"]["total"] >= 0


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
