from __future__ import annotations

from llm_residentd.placement import cpus


def test_parse_cpu_max():
    assert cpus.parse_cpu_max("max 100000\n") is None
    assert cpus.parse_cpu_max("50000 100000") == 0.5
    assert cpus.parse_cpu_max("250000 100000") == 2.5


def test_threads_follow_quota_and_affinity():
    assert cpus.cap(8, None) == (8, "affinity: 8 CPUs")
    assert cpus.cap(8, 0.5) == (1, "quota: 0.5 CPUs")  # never 0, never more than whole CPUs
    assert cpus.cap(8, 2.5) == (2, "quota: 2.5 CPUs")
    assert cpus.cap(2, 4.0) == (2, "affinity: 2 CPUs")
    assert cpus.cap(2, 2.0) == (2, "affinity: 2 CPUs")  # a tie: affinity binds
    assert cpus.cap(1, None) == (1, "affinity: 1 CPUs")


def test_v2_quota_takes_the_tightest_ancestor(tmp_path):
    leaf = tmp_path / "llm.slice" / "w.scope"
    leaf.mkdir(parents=True)
    (tmp_path / "llm.slice" / "cpu.max").write_text("150000 100000\n")
    (leaf / "cpu.max").write_text("max 100000\n")
    assert cpus._v2_quota("/llm.slice/w.scope", tmp_path) == 1.5
    (leaf / "cpu.max").write_text("50000 100000\n")
    assert cpus._v2_quota("/llm.slice/w.scope", tmp_path) == 0.5
    assert cpus._v2_quota("/elsewhere", tmp_path) is None


def test_v1_quota(tmp_path):
    base = tmp_path / "cpu,cpuacct" / "grp"
    base.mkdir(parents=True)
    (base / "cpu.cfs_quota_us").write_text("-1\n")
    (base / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus._v1_quota("/grp", tmp_path) is None
    (base / "cpu.cfs_quota_us").write_text("200000\n")
    assert cpus._v1_quota("/grp", tmp_path) == 2.0


def test_usable_cpus_on_this_machine_is_within_affinity():
    import os
    assert 1 <= cpus.usable_cpus()[0] <= len(os.sched_getaffinity(0))
