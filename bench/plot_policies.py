#!/usr/bin/env python3
"""Plot the policy benchmarks' CSVs (run on the host: the guest has no matplotlib).

    .venv/bin/python bench/plot_policies.py psi bench/results/policy_psi_admission.csv
    .venv/bin/python bench/plot_policies.py guard bench/results/policy_neighbour_guard.csv

Reads CSV, CSV's `_samples.csv` and `_events.csv` siblings; writes CSV with .png.
Needs matplotlib (`pip install -e .[bench]`).
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt

COLORS = {"plain": "tab:red", "psi": "tab:blue", "psi-hold": "tab:purple", "guard": "tab:blue",
          "static": "tab:green",
          "nollm": "tab:gray"}


def load(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def siblings(path: Path) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    stem = path.with_suffix("")
    return load(path), load(Path(f"{stem}_samples.csv")), load(Path(f"{stem}_events.csv"))


def rate(samples: list[dict[str, str]], key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """Per-interval growth of a counter column divided by elapsed seconds."""
    ts, ys = [], []
    for a, b in itertools.pairwise(samples):
        dt = float(b["t_s"]) - float(a["t_s"])
        if dt > 0:
            ts.append(float(b["t_s"]))
            ys.append((float(b[key]) - float(a[key])) / dt * scale)
    return ts, ys


def cpus(cpu_max: str) -> float:
    quota, _, period = cpu_max.partition(" ")
    return float("nan") if quota in ("max", "") else int(quota) / int(period)


def runs_of(rows: list[dict[str, str]], *keys: str) -> dict[tuple[str, ...], list[dict[str, str]]]:
    out: dict[tuple[str, ...], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def plot_psi(path: Path) -> Path:
    rows, samples, events = siblings(path)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    groups = runs_of([r for r in rows if r["outcome"] == "completed"], "condition", "setup")
    labels = sorted(groups)
    ax.boxplot([[float(r["latency_s"]) for r in groups[k]] for k in labels], whis=(5, 95))
    ax.set_xticks(range(1, len(labels) + 1), [f"{c}\n{s}" for c, s in labels])
    ax.set_ylabel("request latency (s), whiskers p5-p95")
    ax.set_title("Latency per request (all rounds pooled)")
    ax = axes[0][1]
    for (cond, setup), rs in sorted(groups.items()):
        lat = sorted(float(r["latency_s"]) for r in rs)
        ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], color=COLORS[setup],
                linestyle="-" if cond == "hog" else ":", label=f"{setup}, {cond}")
    ax.set_xlabel("request latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF (solid: with CPU hog; dotted: control without)")
    ax.legend()
    by_run = runs_of(samples, "condition", "setup", "round")
    ev_run = runs_of(events, "condition", "setup", "round")
    for ax, cond in zip(axes[1], ("hog", "quiet"), strict=False):
        for (c, setup, rnd), ss in sorted(by_run.items()):
            if c != cond:
                continue
            t, y = rate(ss, "sys_cpu_some_us", 100 / 1e6)
            ax.plot(t, y, color=COLORS[setup], alpha=0.8,
                    label=f"{setup} round {rnd}" if rnd == "1" else None)
            if "nbr_cpu_some_us" in ss[0]:
                t, y = rate(ss, "nbr_cpu_some_us", 100 / 1e6)
                ax.plot(t, y, color=COLORS[setup], alpha=0.8, linestyle="--")
            defers = [float(e["t_s"]) for e in ev_run.get((c, setup, rnd), [])
                      if e["action"] == "defer"]
            ax.plot(defers, [102] * len(defers), "|", color=COLORS[setup], markersize=12)
        ax.set_ylim(0, 110)
        ax.set_xlabel("s since load start")
        ax.set_ylabel("system CPU some stall (% of time, 1 s bins)")
        ax.set_title(f"CPU some: system (solid), the hog's top-level cgroup (dashed), "
                     f"{cond}; ticks: defers", fontsize=9)
        ax.legend(loc="lower right")
    fig.suptitle("psi-admission vs the static 50 % quota (guest, TCG): " + path.name)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def plot_guard(path: Path) -> Path:
    rows, samples, _events = siblings(path)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    by_run = runs_of(samples, "setup", "round")
    panels = ((axes[0][0], "neighbour_units", 1.0, "neighbour units of work / s"),
              (axes[1][0], "sys_cpu_some_us", 100 / 1e6, "system CPU some stall (% of time)"))
    for ax, key, scale, label in panels:
        for (setup, rnd), ss in sorted(by_run.items()):
            t, y = rate(ss, key, scale)
            ax.plot(t, y, color=COLORS[setup], alpha=0.8,
                    label=setup if rnd == "1" else None)
            if key == "sys_cpu_some_us" and "nbr_cpu_some_us" in ss[0]:
                t, y = rate(ss, "nbr_cpu_some_us", scale)
                ax.plot(t, y, color=COLORS[setup], alpha=0.8, linestyle="--")
        ax.set_xlabel("s since load start")
        ax.set_ylabel(label)
        ax.legend(loc="lower right")
    axes[0][0].set_title("Neighbour's work rate (1 s bins, every round)")
    axes[1][0].set_title("CPU some: system (solid), the neighbour's top-level cgroup (dashed)")
    ax = axes[0][1]
    for (setup, rnd), ss in sorted(by_run.items()):
        if setup in ("guard", "static"):
            ax.step([float(s["t_s"]) for s in ss], [cpus(s["cpu_max"]) for s in ss],
                    where="post", color=COLORS[setup], label=setup if rnd == "1" else None)
    ax.set_xlabel("s since load start")
    ax.set_ylabel("worker scope cpu.max (CPUs; plain has none)")
    ax.set_title("Quota over time, read from cpu.max")
    ax.legend()
    ax = axes[1][1]
    setups = [s for s in ("plain", "guard", "static", "nollm") if any(k[0] == s for k in by_run)]
    tok = []
    for s in setups:
        done = [r for r in rows if r["setup"] == s and r["outcome"] == "completed"]
        walls = [float(ss[-1]["t_s"]) - float(ss[0]["t_s"]) for k, ss in by_run.items()
                 if k[0] == s]
        tok.append(sum(int(r["tokens"]) for r in done) / sum(walls) if done else 0.0)
    units = []
    for s in setups:
        total = sum(float(ss[-1]["neighbour_units"]) - float(ss[0]["neighbour_units"])
                    for k, ss in by_run.items() if k[0] == s)
        walls = sum(float(ss[-1]["t_s"]) - float(ss[0]["t_s"]) for k, ss in by_run.items()
                    if k[0] == s)
        units.append(total / walls)
    x = range(len(setups))
    ax.bar([i - 0.2 for i in x], units, 0.4, label="neighbour units/s", color="tab:purple")
    ax2 = ax.twinx()
    ax2.bar([i + 0.2 for i in x], tok, 0.4, label="LLM tokens/s", color="tab:orange")
    ax.set_xticks(list(x), setups)
    ax.set_ylabel("neighbour units/s")
    ax2.set_ylabel("LLM tokens/s")
    ax.set_title("Who got the CPU (pooled rounds)")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    fig.suptitle("neighbour-guard vs no policy vs static quota (guest, TCG): " + path.name)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("psi", "guard"):
        print(__doc__, file=sys.stderr)
        return 2
    fn = plot_psi if argv[0] == "psi" else plot_guard
    print(fn(Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
