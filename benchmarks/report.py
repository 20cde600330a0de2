"""Tables and plots of bench_prefill.py results; also merges result files of several runs.

    python benchmarks/report.py run1.json run2.json [--plot out.png]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

# The speed-ups over FLA that "1.5x the best peer (FlashKDA)" means on each card (ANCHORS.md: FLA and
# FlashKDA measured in one process there).
TARGET_VS_FLA = {
    "NVIDIA H100 80GB HBM3": {"A": 3.6, "B": 2.9, "C": 3.4, "D": 3.8},
    "NVIDIA H200": {"A": 3.15, "B": 2.45, "C": 3.21, "D": 3.66},
}


COLUMNS = ["jax_kda", "jax_kda device", "jax_kda softplus", "jax_kda xla", "FLA", "FLA safe_gate", "jla", "jla device"]


def device_or_wall(row, name):
    """A JAX implementation's time: from the device trace where the run measured it ("<name> device"),
    else the wall clock over back-to-back calls."""
    return row.get(f"{name} device", row.get(name))


def table(rows, device):
    lines = [f"Card: {device}. Milliseconds (median); speed-ups are peer time / jax_kda time, JAX times from "
             "the device trace where measured (\"device\" columns).", ""]
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    head = ["case", "T", "H", "seqs"] + cols + ["floor", "vs FLA", "vs FLA safe", "vs jla", "jax_kda / floor",
                                                 "target vs FLA", "max rel diff"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        ours = device_or_wall(r, "jax_kda")
        ratio = lambda c: f"{device_or_wall(r, c) / ours:.2f}x" if c in r else "n/a"
        diffs = [r[d] for d in ("diff vs FLA", "diff vs jla") if d in r]
        target = TARGET_VS_FLA.get(device, {}).get(r["case"])
        cells = [r["case"], str(r["T"]), str(r["H"]), str(r["N"])]
        cells += [f"{r[c]:.3f}" if c in r else "n/a" for c in cols]
        cells += [f"{r['floor']:.3f}", ratio("FLA"), ratio("FLA safe_gate"), ratio("jla"),
                  f"{ours / r['floor']:.2f}x", f"{target}x" if target else "-",
                  f"{max(diffs):.1e}" if diffs else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, device, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in COLUMNS if c != "jax_kda xla" and any(c in r for r in rows)]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / (len(cols) + 1)
    xs = np.arange(len(rows))
    for i, c in enumerate(cols + ["floor"]):
        vals = [r.get(c, np.nan) for r in rows]
        ax.bar(xs + i * width, vals, width, label="byte floor" if c == "floor" else c)
    ax.set_xticks(xs + width * len(cols) / 2, [f"{r['case']}\nT={r['T']}\nH={r['H']} N={r['N']}" for r in rows],
                  fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale, lower is better)")
    ax.set_title(f"KDA prefill forward, {device}")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="JSON files written by bench_prefill.py --json")
    p.add_argument("--plot")
    args = p.parse_args()
    runs = [json.load(open(path)) for path in args.results]
    devices = {r["device"] for r in runs}
    rows = {}
    for run in runs:  # a later file's figures of a case replace an earlier one's, column by column (a
        # `--rows ours` run after a run with the peers keeps the peers)
        for row in run["rows"]:
            rows.setdefault(row["case"], {}).update(row)
    rows = [rows[c] for c in sorted(rows)]
    print(table(rows, ", ".join(sorted(devices))))
    if args.plot:
        plot(rows, ", ".join(sorted(devices)), args.plot)


if __name__ == "__main__":
    main()
