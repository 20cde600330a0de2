"""Global loads whose value is used right after them, in a kernel's SASS.

A load (LDG) whose destination register is read a few instructions later makes the warp wait the
load's whole latency there (~1 us from HBM under load), and a conversion placed right after a
prefetch defeats the prefetch: the factor pass's and the chunk-16 producer's beta loads were
such cases (docs/PERFLOG.md, 2026-12-03). This lists, per kernel, each LDG whose register is first
read within --window instructions (a move counts: it waits for the load too).

    nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
        -I<cutlass>/include -cubin -o k.cubin csrc/kda_two_pass_kernel.cu
    python benchmarks/load_use.py k.cubin [--window 8] [--kernel factor_pass]

A .cubin is disassembled with nvdisasm (NVDISASM, else on PATH); a .sass file is read as it is.
"""
import argparse
import os
import re
import subprocess
import sys

LOAD = re.compile(r"\bLDG(?:\.[\w.]+)?\s+(R\d+)")
FUNCTION = re.compile(r"^\.text\.(\S+):")


def sass_lines(path):
    if path.endswith(".sass"):
        with open(path) as f:
            return f.read().splitlines()
    tool = os.environ.get("NVDISASM", "nvdisasm")
    return subprocess.run([tool, "-c", path], check=True, capture_output=True, text=True).stdout.splitlines()


def early_uses(lines, window):
    """(function, load line, use line, register) for loads read within `window` instructions."""
    function, pending, found, count = "?", {}, [], 0
    for line in lines:
        name = FUNCTION.match(line)
        if name:
            function, pending, count = name.group(1), {}, 0
            continue
        instruction = line.split(";")[0]
        if "/*" not in instruction:
            continue
        count += 1
        operands = instruction.split("*/", 1)[-1]
        load = LOAD.search(operands)
        # What the instruction reads: its operands after the first, and the first when it is an address.
        first, _, rest = operands.partition(",")
        sources = rest + (first if "[" in first else "")
        for register, (at, text) in list(pending.items()):
            if re.search(rf"\b{register}\b", sources):
                if count - at <= window:
                    found.append((function, text.strip(), line.strip(), register))
                del pending[register]
            elif "[" not in first and "@" not in first and re.search(rf"\b{register}\b", first):
                del pending[register]  # written again (unpredicated) before any read: never waited for
        if load:  # LOAD's pattern leaves out LDGSTS (global to shared: no register) and LDGDEPBAR
            pending[load.group(1)] = (count, line)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("binary", help="a .cubin (disassembled with nvdisasm) or a .sass listing")
    parser.add_argument("--window", type=int, default=8, help="instructions between the load and its first use")
    parser.add_argument("--kernel", default="", help="only functions whose mangled name contains this")
    args = parser.parse_args()
    found = [f for f in early_uses(sass_lines(args.binary), args.window) if args.kernel in f[0]]
    for function, load, use, register in found:
        print(f"{function}\n    {load}\n    {use}   <- {register}")
    print(f"{len(found)} loads used within {args.window} instructions", file=sys.stderr)


if __name__ == "__main__":
    main()
