"""The instructions where a profiled kernel's warps stall most, from Nsight Compute's source page
(`ncu -i report.ncu-rep --page source --csv --print-source sass`, as `gpu_session.sh profile` writes it),
and the same samples summed by opcode and by stretch between barriers: which phase of a kernel holds its
time.

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
    regions(rows, source, samples, stalls, total)


def regions(rows, source, samples, stalls, total):
    """The kernel cut at its barriers (BAR.SYNC): each stretch's instructions executed (warp level),
    its share of the samples and its two largest stall reasons. A kernel's phases are the stretches
    between its group barriers, so this is the per-phase view the phase clocks give, from the profile
    (a barrier's waits count in the stretch after it: the sample lands on the instruction that waits)."""
    executed = next((h for h in rows[0] if h.strip() == "Instructions Executed"), None) if rows else None
    if executed is None:
        return
    reasons = [h for h in stalls if h.startswith("stall_") and "Not Issued" not in h]
    cuts = [0] + [i for i, r in enumerate(rows) if "BAR.SYNC" in r[source]] + [len(rows)]
    print("by stretch between barriers (warp instructions executed, share of samples, top stalls):")
    for a, b in zip(cuts, cuts[1:]):
        part = rows[a:b]
        if not part:
            continue
        share = sum(number(r[samples]) for r in part) / total
        top = sorted(((sum(number(r[h]) for r in part), h) for h in reasons), reverse=True)[:2]
        print(f"  {part[0].get('Address', '')} .. {part[-1].get('Address', '')}: {len(part):5d} instructions, "
              f"{sum(number(r[executed]) for r in part):12.0f} executed, {100 * share:5.1f}% of samples; "
              + ", ".join(f"{h} {100 * n / total:.1f}%" for n, h in top))


if __name__ == "__main__":
    main()
