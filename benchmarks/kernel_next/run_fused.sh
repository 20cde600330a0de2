#!/usr/bin/env bash
# Builds, checks and times the fused chunk-32 prefill prototype (fused_prefill.cu) on a Hopper GPU.
# From the repository root, in one device call:
#   bash benchmarks/kernel_next/run_fused.sh
# Steps: build with nvcc for sm_90a (ptxas resource report kept: registers, spills, C75xx warnings),
# SASS counts (HGMMA, wgmma waits, local-memory accesses), the CPU-only checks, compute-sanitizer
# memcheck on a tiny launch, then the full run (checks of o and the final state against float64 and
# the CPU emulation, every output written; timings of case A and the shapes of E, F and D), and a short
# table at the end. Logs go to $OUT (default /tmp/fused_out). Every step has a time limit, so a hang
# (a barrier bug) still leaves its logs. Environment: OUT, NVCC (default nvcc), BUILD_DIR, REPS,
# SKIP_SANITIZER=1.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-/tmp/fused_out}
build=${BUILD_DIR:-/tmp/fused_build}
nvcc_bin=${NVCC:-nvcc}
mkdir -p "$out" "$build"
# The kernels' headers are the library's (csrc/chunk32).
flags=(-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -lineinfo -Xptxas -v -I"$here/../../csrc/chunk32")
status=0

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader \
  | tee "$out/gpu.txt"
"$nvcc_bin" --version | tail -1

# 1. Build (about 30 s).
start=$SECONDS
if ! "$nvcc_bin" "${flags[@]}" "$here/fused_prefill.cu" -o "$build/fused_prefill" > "$out/build.log" 2>&1; then
  echo "build FAILED"; tail -40 "$out/build.log"; exit 1
fi
echo "built in $((SECONDS - start)) s; ptxas: $(grep -E 'Used [0-9]+ registers' "$out/build.log" | grep -v 'Used [12][0-9] reg' \
  | sed -E 's/.*Used ([0-9]+) registers.*/\1/' | tr '\n' ' ')registers at entry (setmaxnreg: state 160, factor 96);" \
  "spills: $(grep -oE '[0-9]+ bytes spill stores' "$out/build.log" | sort -u | tr '\n' ' ');" \
  "C75xx: $(grep -cE 'C75[0-9]+' "$out/build.log")"

# 2. SASS (the state region starts at the setmaxnreg increase).
if command -v cuobjdump > /dev/null; then
  cuobjdump --dump-sass "$build/fused_prefill" > "$out/fused_prefill.sass" 2>&1
  echo "SASS: HGMMA $(grep -c HGMMA "$out/fused_prefill.sass"), WARPGROUP.DEPBAR $(grep -c 'WARPGROUP.DEPBAR' \
    "$out/fused_prefill.sass"), STL $(grep -c 'STL' "$out/fused_prefill.sass"), LDL $(grep -c 'LDL' "$out/fused_prefill.sass")" \
    "(two kernels: ex2+rcp and tanh gates)"
fi

# 3. CPU-only checks: layouts, and the kernel's algorithm emulated against float64.
timeout 120 "$build/fused_prefill" --host-check 1 --tokens 1024 2>&1 | tee "$out/host_check.log" || status=1

# 4. Memory check on a tiny launch (T = 96 and T = 50, two and four heads).
if [[ -z "${SKIP_SANITIZER:-}" ]] && command -v compute-sanitizer > /dev/null; then
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$build/fused_prefill" --tiny 1 \
    > "$out/memcheck.log" 2>&1
  rc=$?
  echo "memcheck: rc $rc ($(grep -h 'ERROR SUMMARY' "$out/memcheck.log" | tr '\n' ' '))"
  [[ $rc -ne 0 ]] && { status=1; tail -20 "$out/memcheck.log"; }
fi

# 5. Full run: checks, then timings.
timeout 400 "$build/fused_prefill" --reps "${REPS:-20}" 2>&1 | tee "$out/fused_prefill.log"
rc=${PIPESTATUS[0]}
[[ $rc -ne 0 ]] && status=1
[[ $rc -eq 124 ]] && echo "fused_prefill TIMED OUT (a hang: see the last check line above)"

# 6. Summary (the reply keeps the end of the output).
echo
echo "==== summary ($(cat "$out/gpu.txt"))"
grep -E '^(emulated|layouts|host check)' "$out/host_check.log"
grep -E '^check ' "$out/fused_prefill.log" | cut -c1-200
sed -n '/^case  variant/,$p' "$out/fused_prefill.log"
exit $status
