#!/usr/bin/env python3
"""Plot bench/peers.py's CSV: tokens/s, TTFT, latency p95, the server's peak RSS (when the
run recorded it) and the neighbours' work rate per setup.

    .venv/bin/python bench/plot_peers.py                        # the last run in bench/results/peers.csv
    .venv/bin/python bench/plot_peers.py bench/results/peers.csv --run 2026-11-29T17:00:00Z

Bars are the means over rounds, dots the single rounds. Writes CSV with .png unless --out
says otherwise. Needs matplotlib (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "peers.csv"
COLORS = {"residentd": "tab:blue", "residentd-t1": "tab:cyan", "residentd-t2": "tab:purple",
          "llama-server": "tab:red", "llama-server-t1": "tab:orange", "alone": "tab:gray"}


def load(path: Path, run_id: str | None) -> tuple[str, list[dict[str, str]]]:
    """The rows of run_id (default: the last run in the file)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise SystemExit(f"{path} has no rows")
    run_id = run_id or rows[-1]["run"]
    return run_id, [r for r in rows if r["run"] == run_id]


def bars(ax: plt.Axes, rows: list[dict[str, str]], groups: list[tuple[str, int]], setups: list[str],
         metric: str) -> None:
    """One group of bars per (condition, clients), one bar per setup, dots for the rounds."""
    width = 0.8 / max(1, len(setups))
    for i, setup in enumerate(setups):
        labelled = False  # one legend entry per setup
        for g, (condition, clients) in enumerate(groups):
            vals = [float(r[metric]) for r in rows if (r["setup"], r["condition"], int(r["clients"]))
                    == (setup, condition, clients) and r[metric] not in ("", "nan")]
            if not vals:
                continue
            x = g + (i - (len(setups) - 1) / 2) * width
            ax.bar(x, statistics.fmean(vals), width, color=COLORS.get(setup, "tab:green"),
                   label=None if labelled else setup)
            labelled = True
            ax.scatter([x] * len(vals), vals, s=10, color="black", zorder=3)
    ax.set_xticks(range(len(groups)), [f"{c}\n{n} client{'s' if n > 1 else ''}" if n else f"{c}\nalone"
                                       for c, n in groups])


def plot(path: Path, run_id: str | None, out: Path) -> Path:
    run_id, rows = load(path, run_id)
    setups = list(dict.fromkeys(r["setup"] for r in rows if r["setup"] != "alone"))
    groups = list(dict.fromkeys((r["condition"], int(r["clients"])) for r in rows if r["setup"] != "alone"))
    nbr_groups = [g for g in groups if g[0] == "neighbours"]
    # Runs since issue 14 record RSS and the slots setting; older rows have neither.
    rss = any(r.get("rss_max_mb") not in (None, "", "nan") for r in rows if r["setup"] != "alone")
    panels = 2 + 2 * rss + bool(nbr_groups)
    fig, axes = plt.subplots(panels, 1, figsize=(11, 3.6 * panels))
    bars(axes[0], rows, groups, setups, "tokens_per_s")
    axes[0].set_ylabel("tokens/s (all clients)")
    axes[0].legend(fontsize=8, ncol=len(setups))
    bars(axes[1], rows, groups, setups, "ttft_p50_ms")
    axes[1].set_ylabel("TTFT p50, ms")
    axes[1].set_yscale("log")
    if rss:
        bars(axes[2], rows, groups, setups, "latency_p95_ms")
        axes[2].set_ylabel("latency p95, ms")
        bars(axes[3], rows, groups, setups, "rss_max_mb")
        axes[3].set_ylabel("peak RSS of the server tree, MB")
    if nbr_groups:
        alone = [float(r["neighbour_units_per_s"]) for r in rows if r["setup"] == "alone"]
        bars(axes[-1], rows, nbr_groups, setups, "neighbour_units_per_s")
        if alone:
            axes[-1].axhline(statistics.fmean(alone), color=COLORS["alone"], linestyle="--",
                             label=f"neighbours alone ({statistics.fmean(alone):.0f})")
            axes[-1].legend(fontsize=8)
        axes[-1].set_ylabel("neighbours' units/s")
    slots = {r.get("slots") for r in rows} - {None, "", "0"}
    title = f"bench/peers.py run {run_id}" + (f", {'/'.join(sorted(slots))} slots" if slots else "")
    fig.suptitle(f"{title}: bars = mean over rounds, dots = rounds", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="?", type=Path, default=DEFAULT_CSV)
    p.add_argument("--run", help="run id (default: the last run in the file)")
    p.add_argument("--out", type=Path, help="PNG to write (default: the CSV with .png)")
    args = p.parse_args()
    print(plot(args.csv, args.run, args.out or args.csv.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
