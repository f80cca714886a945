#!/usr/bin/env python3
"""Plot the priority and kv-trim guest benchmarks from their CSVs (run on the host).

    .venv/bin/python bench/plot_priority_kv.py   # needs matplotlib: pip install -e '.[bench]'
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def plot_priority(src: Path, out: Path) -> None:
    data = rows(src)
    setups = ["alone", "off", "restore", "recompute"]
    ttft = [[float(r["ttft_ms"]) for r in data if r["setup"] == s and r["kind"] == "urgent"]
            for s in setups]
    resume = {s: [float(r["prefill_ms"]) for r in data if r["kind"] == "long"
                  and r["resume"] == s] for s in ("restore", "recompute")}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.boxplot(ttft, tick_labels=setups, whis=(5, 95))
    a.set_yscale("log")
    a.set_ylabel("urgent request TTFT (ms, log)")
    a.set_title("Urgent requests behind long ones")
    b.boxplot(list(resume.values()), tick_labels=list(resume), whis=(5, 95))
    b.set_ylabel("resume: time to the first new token (ms)")
    b.set_title("Preempted long requests")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


def plot_kv(src: Path, out: Path) -> None:
    series: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows(src):
        if r["round"] == "1":
            series[r["setup"]].append(r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for setup, points in series.items():
        t = [float(p["t"]) for p in points]
        a.plot(t, [int(p["tokens"]) for p in points], label=setup)
        line, = b.plot(t, [int(p["memory_current"]) / 2**20 for p in points], label=setup)
        high = [(x, float(p["memory_high_mb"])) for x, p in zip(t, points, strict=True)
                if p["memory_high_mb"]]
        b.plot([x for x, _ in high], [y for _, y in high], "--", color=line.get_color(),
               linewidth=0.8, label=f"{setup}: memory.high")
    a.set_xlabel("seconds")
    a.set_ylabel("tokens generated")
    a.set_title("Decoding under a memory.high squeeze")
    b.set_xlabel("seconds")
    b.set_ylabel("scope memory.current, memory.high dashed (MiB)")
    b.set_title("The worker's memory")
    a.legend()
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    plot_priority(args.results / "policy_priority.csv", args.results / "policy_priority.png")
    plot_kv(args.results / "policy_kv_trim_samples.csv", args.results / "policy_kv_trim.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
