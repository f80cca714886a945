"""cpuload on a fake /proc: parsing, and the rates of a window of readings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from llm_residentd.control import cpuload
from llm_residentd.control.cpumonitor import Cap, CpuMonitor

TCK = cpuload.CLK_TCK


def write_proc(root: Path, *, busy: tuple[int, int], idle: tuple[int, int], running: int,
               tasks: dict[str, tuple[str, int, int, int]], stall: int | None = None) -> None:
    """/proc/stat with two CPUs; pid 42's threads: tid -> (state, cpu_ns, wait_ns, nivcsw)."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    for cpu, (b, i) in enumerate(zip(busy, idle, strict=True)):
        lines.append(f"cpu{cpu} {b} 0 0 {i} 0 0 0 0 0 0")
    lines += ["intr 1 2 3", f"procs_running {running}", "procs_blocked 0"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text("\n".join(lines) + "\n")
    for tid, (state, cpu_ns, wait_ns, nivcsw) in tasks.items():
        task = root / "42" / "task" / tid
        task.mkdir(parents=True, exist_ok=True)
        (task / "stat").write_text(f"{tid} (python (worker)) {state} 1 2 3\n")
        (task / "schedstat").write_text(f"{cpu_ns} {wait_ns} 7\n")
        (task / "status").write_text(f"Name:\tpython\nvoluntary_ctxt_switches:\t5\n"
                                     f"nonvoluntary_ctxt_switches:\t{nivcsw}\n")
    if stall is not None:
        (root / "cpu.pressure").write_text(f"some avg10=1.00 avg60=0.00 avg300=0.00 total={stall}\n"
                                           "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")


def reading(root: Path, at: float, **kw) -> cpuload.Reading:
    write_proc(root, **kw)
    return cpuload.read(at, {"m-0": 42}, [root / "cpu.pressure"], proc=root)


def test_a_worker_beside_a_busy_neighbour(tmp_path):
    # t=0 -> t=1: both CPUs busy; the worker used 1.2 CPUs and waited 0.6 threads; one
    # other task was runnable in every reading (procs_running 4 = 2 worker threads,
    # the neighbour, the reader)
    r0 = reading(tmp_path, 0.0, busy=(0, 0), idle=(0, 0), running=4, stall=1_000_000,
                 tasks={"42": ("R", 0, 0, 10), "43": ("R", 0, 0, 20)})
    r1 = reading(tmp_path, 0.5, busy=(TCK // 2, TCK // 2), idle=(0, 0), running=4,
                 stall=1_250_000,
                 tasks={"42": ("R", 300_000_000, 150_000_000, 60), "43": ("R", 300_000_000,
                                                                          150_000_000, 70)})
    r2 = reading(tmp_path, 1.0, busy=(TCK, TCK), idle=(0, 0), running=4, stall=1_500_000,
                 tasks={"42": ("R", 600_000_000, 300_000_000, 110), "43": ("R", 600_000_000,
                                                                           300_000_000, 120)})
    v = cpuload.view([r0, r1, r2])
    assert v.cpus == 2 and v.seconds == 1.0 and v.samples == 3
    assert v.idle == 0.0
    assert v.others_running == pytest.approx(1.0)
    assert v.others_cpu == pytest.approx(0.8)
    assert v.stall == pytest.approx(0.5)
    load = v.workers["m-0"]
    assert load.threads == 2 and load.running == 2.0
    assert load.cpu == pytest.approx(1.2) and load.wait == pytest.approx(0.6)
    assert load.nivcsw == pytest.approx(200)


def test_recent_readings_speak_for_now_and_a_gone_worker_is_left_out(tmp_path):
    quiet = {"busy": (0, 0), "idle": (0, 0), "tasks": {"42": ("S", 0, 0, 0)}}
    r = [reading(tmp_path, t, running=1, **quiet) for t in (0.0, 0.2, 0.4)]
    busy = {"busy": (0, 0), "idle": (0, 0), "tasks": {"42": ("S", 0, 0, 0)}}
    r += [reading(tmp_path, t, running=3, **busy) for t in (0.41, 0.42, 0.43)]
    v = cpuload.view(r)  # the last three readings saw two other runnable tasks
    assert v.others_running == pytest.approx(2.0)
    assert cpuload.view(r, recent=6).others_running == pytest.approx(1.0)
    assert cpuload.view(r[:1]) is None
    (tmp_path / "42" / "task" / "42" / "stat").unlink()  # the thread ended mid-read
    gone = cpuload.read(0.5, {"m-0": 42, "m-1": 999}, [], proc=tmp_path)
    assert gone.workers == {"m-0": cpuload.TaskCounters()}  # no thread left, no m-1
    assert gone.stall_us is None


def test_only_the_workers_cpus_count(tmp_path):
    r0 = reading(tmp_path, 0.0, busy=(0, 0), idle=(0, 0), running=1, tasks={})
    r1 = reading(tmp_path, 1.0, busy=(TCK, 0), idle=(0, TCK), running=1, tasks={})
    assert cpuload.view([r0, r1]).idle == pytest.approx(1.0)
    assert cpuload.view([r0, r1], cpus={0}).idle == 0.0
    assert cpuload.view([r0, r1], cpus={1}).idle == pytest.approx(1.0)


def test_this_machine_reads(tmp_path):
    r = cpuload.read(0.0, {"me": os.getpid()})
    assert r.procs_running >= 1 and r.busy and r.workers["me"].threads >= 1


def test_the_monitor_reads_fast_only_where_a_count_could_move():
    m = CpuMonitor(dict, set, list, lambda: None, 0.2, None)
    m.mode = "polling"
    m.movable = lambda: {"a-0"}
    for caps, period in (({"a-0": Cap(2, None)}, 0.2), ({"a-0": Cap(1, None)}, 1.0),
                         ({"a-0": Cap(4, 1.5)}, 1.0), ({"a-0": Cap(4, 2.0)}, 0.2),
                         ({"b-0": Cap(8, None)}, 1.0)):  # b-0 is pinned
        m.caps = caps
        assert m.period == period, caps
    m.caps, m.mode = {"a-0": Cap(2, None)}, "psi-trigger"
    assert m.period == 1.0  # a trigger wakes it


def test_a_triggered_reading_speaks_for_its_own_instant(tmp_path):
    quiet = {"busy": (0, 0), "idle": (0, 0), "tasks": {"42": ("R", 0, 0, 0)}}
    r = [reading(tmp_path, t, running=2, **quiet) for t in (0.0, 0.5)]
    write_proc(tmp_path, running=4, **quiet)  # two neighbours just started
    r.append(cpuload.read(0.6, {"m-0": 42}, [], proc=tmp_path, trigger="threads/m-0"))
    v = cpuload.view(r)
    assert v.trigger == "threads/m-0"
    assert v.others_running == pytest.approx(2.0)  # not diluted by the older readings
    timed = cpuload.read(0.6, {"m-0": 42}, [], proc=tmp_path)
    assert cpuload.view([*r[:2], timed]).others_running == pytest.approx(2 / 3)
