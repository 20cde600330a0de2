"""The instructions where a profiled kernel's warps stall most, from Nsight Compute's source page
(`ncu -i report.ncu-rep --page source --csv --print-source sass`, as `gpu_session.sh profile` writes it),
and the same samples summed by opcode: which phase of a kernel holds its time.

    python benchmarks/ncu_hotspots.py ncu_source.csv [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import csv


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source_csv")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    lines = open(args.source_csv).read().splitlines()
    # Nsight Compute may put the kernel's name on a line of its own above the table's header.
    start = next((i for i, line in enumerate(lines) if line.startswith('"Address"')), 0)
    rows = [r for r in csv.DictReader(lines[start:]) if r]
    header = list(rows[0]) if rows else []
    samples = next((h for h in header if h.startswith("Warp Stall Sampling (All")), None)
    source = next((h for h in header if h.strip() == "Source"), None)
    if samples is None or source is None:
        raise SystemExit(f"no sampling or source column among: {header}")
    stalls = [h for h in header if "stall" in h.lower() and h != samples]
    total = sum(number(r[samples]) for r in rows) or 1.0
    print(f"{len(rows)} instructions, {total:.0f} warp samples")
    for r in sorted(rows, key=lambda r: -number(r[samples]))[: args.top]:
        detail = ", ".join(f"{h} {number(r[h]):.0f}" for h in stalls if number(r[h]) > 0)
        print(f"{100 * number(r[samples]) / total:5.1f}%  {r.get('Address', '')}  {r[source].strip()[:60]:60}  {detail}")
    by_opcode = collections.Counter()
    for r in rows:
        words = [w for w in r[source].split() if not w.startswith("@")]  # the predicate is not the opcode
        by_opcode[words[0].split(".")[0] if words else "?"] += number(r[samples])
    print("by opcode:", ", ".join(f"{op} {100 * n / total:.1f}%" for op, n in by_opcode.most_common(12)))


if __name__ == "__main__":
    main()
