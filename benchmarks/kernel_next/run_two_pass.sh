#!/usr/bin/env bash
# Builds, checks and times the two-pass chunk-32 prefill (two_pass.cu) on a Hopper GPU. From the
# repository root, in one device call:
#   bash benchmarks/kernel_next/run_two_pass.sh
# Steps: build with nvcc for sm_90a (ptxas resource report: registers, spills, C75xx warnings), SASS
# counts per kernel, the CPU-only checks, compute-sanitizer memcheck (and racecheck, for information) on
# a tiny launch, then the full run (o and the final state against float64 and the CPU emulation, pass 1's
# factors against float64, every output written; windows of chunks, serial and overlapped, bit for bit
# against one pass; timings of pass 1, pass 2 and both for A, E, F and D, then both window by window);
# then a second binary built with -DCHUNK32_PHASE_CLOCKS (the real timings stay uninstrumented) prints
# pass 1's per-phase clock64 table for A (every variant) and F; a summary at the end. Every step has a
# time limit, so a hang (a barrier bug) still leaves its logs.
# $OUT (default /tmp/two_pass_out) receives at most 8 files (the device call brings back 8, 2 folders
# deep at most): build.log, host_check.log, memcheck.log, racecheck.log, two_pass.log, phases.log,
# summary.txt and extra.tar.gz (the SASS, the GPU line, the instrumented build's ptxas log).
# Environment: OUT, NVCC (default nvcc), BUILD_DIR, REPS, SKIP_SANITIZER=1, SKIP_RACECHECK=1, TWO_PASS_ARGS
# (e.g. "--timing-only 1": no float64 checks of the timed shapes, which take minutes on the CPU).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-/tmp/two_pass_out}
build=${BUILD_DIR:-/tmp/two_pass_build}
extra="$build/extra"
nvcc_bin=${NVCC:-nvcc}
mkdir -p "$out" "$build" "$extra"
# The kernels' headers are the library's (csrc/chunk32).
flags=(-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -lineinfo -Xptxas -v -I"$here/../../csrc/chunk32")
status=0
summary="$out/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader \
  > "$extra/gpu.txt" 2>&1
say "GPU: $(cat "$extra/gpu.txt")"
say "nvcc: $("$nvcc_bin" --version | tail -1)"

# 1. Build (about 10 s).
start=$SECONDS
if ! timeout 300 "$nvcc_bin" "${flags[@]}" "$here/two_pass.cu" -o "$build/two_pass" > "$out/build.log" 2>&1; then
  say "build FAILED"; tail -40 "$out/build.log"; exit 1
fi
say "built in $((SECONDS - start)) s; ptxas per kernel:"
ptxas_report() {
awk '/Compiling entry function/ && !/pass_kernel/ { name = ""; next }
     /Compiling entry function/ { name = $0; sub(/.*two_pass[0-9]+/, "", name); sub(/ILNS0.*|ENS0.*/, "", name);
       gate = ($0 ~ /GateMathE0/) ? " (tanh gate" : ($0 ~ /GateMathE1/) ? " (ex2+rcp gate" : ($0 ~ /GateMathE2/) ? " (softplus gate" : ($0 ~ /GateMathE3/) ? " (log-decay gate" : "";
       if (gate != "") gate = gate (($0 ~ /Li4ELi/) ? ", 4-warp inverse" : "") (($0 ~ /Li1ELi4EE/) ? ", lean)" : ")") }
     /spill stores/ { spill = $0; sub(/^ +/, "", spill) }
     /Used [0-9]+ registers/ && name != "" { match($0, /Used [0-9]+ registers/);
       print "  " name gate ": " substr($0, RSTART, RLENGTH) ", " spill; name = "" }' "$1" | tee -a "$summary"
}
ptxas_report "$out/build.log"
say "  C75xx warnings: $(grep -cE 'C75[0-9]+' "$out/build.log")"
# The instrumented build (pass 1's phase clocks), beside it; its ptxas log goes into extra.tar.gz.
phases_bin=""
if timeout 300 "$nvcc_bin" "${flags[@]}" -DCHUNK32_PHASE_CLOCKS "$here/two_pass.cu" -o "$build/two_pass_phases" \
    > "$extra/build_phases.log" 2>&1; then
  phases_bin="$build/two_pass_phases"
  say "instrumented build (-DCHUNK32_PHASE_CLOCKS), ptxas per kernel:"
  ptxas_report "$extra/build_phases.log"
else
  say "instrumented build FAILED (see extra.tar.gz: extra/build_phases.log)"
fi

# 2. SASS counts per kernel.
if command -v cuobjdump > /dev/null; then
  cuobjdump --dump-sass "$build/two_pass" > "$extra/two_pass.sass" 2>&1
  awk '/Function :/ { if (f != "") print f, n, hg, dep, stg, stl, ldl, mma, mufu;
                      f = $3; n = hg = dep = stg = stl = ldl = mma = mufu = 0; next }
       /^ +\/\*[0-9a-f]+\*\// { n++; if (/HGMMA/) hg++; if (/WARPGROUP.DEPBAR/) dep++; if (/ STG/) stg++;
                      if (/ STL/) stl++; if (/ LDL/) ldl++; if (/ HMMA/) mma++; if (/ MUFU/) mufu++ }
       END { if (f != "") print f, n, hg, dep, stg, stl, ldl, mma, mufu }' "$extra/two_pass.sass" \
    | grep pass_kernel | awk '{ name = $1; sub(/.*two_pass[0-9]+/, "", name); sub(/ILNS0.*|ENS0.*/, "", name);
        gate = ($1 ~ /GateMathE0/) ? "(tanh)" : ($1 ~ /GateMathE1/) ? "(ex2+rcp)" : ($1 ~ /GateMathE2/) ? "(softplus)" : ($1 ~ /GateMathE3/) ? "(log-decay)" : "";
        if ($1 ~ /Li4ELi/) gate = gate "(4-warp inverse)";
        if ($1 ~ /Li1ELi4EE/) gate = gate "(lean: 1 slot, 4 CTAs)";
        printf "  SASS %s%s: %d instructions, HGMMA %d, WARPGROUP.DEPBAR %d, STG %d, STL %d, LDL %d, HMMA %d, MUFU %d\n",
          name, gate, $2, $3, $4, $5, $6, $7, $8, $9 }' | tee -a "$summary"
fi

# 3. CPU-only checks: layouts, the pass-1 schedule, what pass 2 copies, the emulation against float64.
timeout 120 "$build/two_pass" --host-check 1 --tokens 1024 > "$out/host_check.log" 2>&1 || status=1
say "host check: $(tail -1 "$out/host_check.log")"

# 4. Memory check (and race check, for information) on a tiny launch (T = 96 and 50).
if [[ -z "${SKIP_SANITIZER:-}" ]] && command -v compute-sanitizer > /dev/null; then
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$build/two_pass" --tiny 1 > "$out/memcheck.log" 2>&1
  rc=$?
  say "memcheck: rc $rc ($(grep -h 'ERROR SUMMARY' "$out/memcheck.log" | tr '\n' ' '))"
  [[ $rc -ne 0 ]] && { status=1; tail -20 "$out/memcheck.log"; }
  if [[ -z "${SKIP_RACECHECK:-}" ]]; then
    timeout 300 compute-sanitizer --tool racecheck "$build/two_pass" --tiny 1 > "$out/racecheck.log" 2>&1
    say "racecheck (information): rc $? ($(grep -h 'RACECHECK SUMMARY\|ERROR SUMMARY' "$out/racecheck.log" | tr '\n' ' '))"
  fi
fi

# 5. Full run: checks, then timings.
timeout 420 stdbuf -oL "$build/two_pass" --reps "${REPS:-20}" ${TWO_PASS_ARGS:-} > "$out/two_pass.log" 2>&1
rc=$?
[[ $rc -ne 0 ]] && status=1
[[ $rc -eq 124 ]] && say "two_pass TIMED OUT (a hang: see the last check line of two_pass.log)"

# 6. Pass 1's phases (instrumented binary, once, after the real timings): A every variant, F the first.
if [[ -n "$phases_bin" ]]; then
  timeout 180 stdbuf -oL "$phases_bin" --phases 1 --reps 10 > "$out/phases.log" 2>&1
  prc=$?
  [[ $prc -ne 0 ]] && status=1
  [[ $prc -eq 124 ]] && say "two_pass_phases TIMED OUT"
fi

tar -czf "$out/extra.tar.gz" -C "$build" extra 2>/dev/null

# 7. Summary (the reply keeps the end of the output).
{
  echo
  echo "==== summary"
  grep -E '^(two_pass:|pass 1:)' "$out/two_pass.log"
  grep -E '^check ' "$out/two_pass.log" | cut -c1-260
  sed -n '/^medians of/,$p' "$out/two_pass.log"
  echo "full run rc $rc, status $status"
  if [[ -f "$out/phases.log" ]]; then
    echo "==== pass 1 phases (instrumented build, rc ${prc:-none})"
    grep -vE '^(two_pass:|pass 1:)' "$out/phases.log" | cut -c1-120
  fi
} | tee -a "$summary"
exit $status
