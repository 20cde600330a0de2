#!/usr/bin/env bash
# Builds and runs the issue-10 go/no-go microkernels (state_chain, factor_build) on a Hopper GPU.
# From the repository root, in one device call:
#   bash benchmarks/kernel_next/run_micro.sh
# Steps: build both with nvcc for sm_90a (ptxas resource report kept), a factor_build capped at
# FACTOR_REGS registers (what two factor warpgroups may get beside two state warpgroups), SASS dumps,
# compute-sanitizer memcheck and racecheck on tiny launches, the full runs (checks, then timings),
# and a short table at the end. Logs and SASS go to $OUT (default /tmp/kernel_next_out).
# Environment: OUT, NVCC (default nvcc), FACTOR_REGS (default 96), SKIP_SANITIZER=1, STEPS, CHUNKS.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-/tmp/kernel_next_out}
build=${BUILD_DIR:-/tmp/kernel_next_build}
nvcc_bin=${NVCC:-nvcc}
mkdir -p "$out" "$build"
# The kernels' headers are the library's (csrc/chunk32).
flags=(-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -lineinfo -Xptxas -v -I"$here/../../csrc/chunk32")
status=0

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader \
  | tee "$out/gpu.txt"
"$nvcc_bin" --version | tail -1

# 1. Builds (about 20 s each); the resource report lands in build_*.log.
build_one() {  # name source extra-flags...
  local name=$1 src=$2
  shift 2
  local start=$SECONDS
  if ! "$nvcc_bin" "${flags[@]}" "$@" "$here/$src" -o "$build/$name" > "$out/build_$name.log" 2>&1; then
    echo "build of $name FAILED"; tail -30 "$out/build_$name.log"; exit 1
  fi
  echo "built $name in $((SECONDS - start)) s: $(grep -E 'Used [0-9]+ registers' "$out/build_$name.log" \
    | sed -E 's/.*Used ([0-9]+) registers.*/\1/' | sort -u | tr '\n' ' ')registers;" \
    "$(grep -c 'bytes spill stores' "$out/build_$name.log") kernels," \
    "spills: $(grep -oE '[0-9]+ bytes spill stores' "$out/build_$name.log" | sort -u | tr '\n' ' ')" \
    "$(grep -E 'C75[0-9]+' "$out/build_$name.log" | head -3)"
}
build_one state_chain state_chain.cu
build_one factor_build factor_build.cu
build_one factor_build_capped factor_build.cu -DKN_FACTOR_MAX_REGS="${FACTOR_REGS:-96}"

# 2. SASS for later reading (HGMMA in the chain, instruction mix of the factor build).
if command -v cuobjdump > /dev/null; then
  for name in state_chain factor_build; do cuobjdump --dump-sass "$build/$name" > "$out/$name.sass" 2>&1; done
  echo "HGMMA in state_chain: $(grep -c HGMMA "$out/state_chain.sass"), WARPGROUP.DEPBAR: $(grep -c 'WARPGROUP.DEPBAR' "$out/state_chain.sass")"
fi

# 3. Memory and race checks on tiny launches (no timing).
if [[ -z "${SKIP_SANITIZER:-}" ]] && command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$build/state_chain" --steps 8 --check-steps 8 --ctas 2 \
      --pool 4 --only-check 1 > "$out/${tool}_state_chain.log" 2>&1
    rc_chain=$?
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$build/factor_build" --chunks 8 --ctas 2 --only-check 1 \
      > "$out/${tool}_factor_build.log" 2>&1
    rc_factor=$?
    echo "$tool: state_chain rc $rc_chain, factor_build rc $rc_factor ($(grep -h 'ERROR SUMMARY' \
      "$out/${tool}_state_chain.log" "$out/${tool}_factor_build.log" | tr '\n' ' '))"
    # memcheck failures fail the run; racecheck is reported only (it does not see the copy engine's
    # writes, so hazards it names need reading before they are believed).
    [[ $tool == memcheck && ( $rc_chain -ne 0 || $rc_factor -ne 0 ) ]] && status=1
  done
fi

# 4. Full runs: correctness checks first, then timings (132 CTAs, one per SM).
"$build/state_chain" --steps "${STEPS:-1024}" 2>&1 | tee "$out/state_chain.log" || status=1
"$build/factor_build" --chunks "${CHUNKS:-1024}" 2>&1 | tee "$out/factor_build.log" || status=1
"$build/factor_build_capped" --chunks "${CHUNKS:-1024}" 2>&1 | tee "$out/factor_build_capped.log" || status=1

# 5. Summary (the reply keeps the end of the output).
echo
echo "==== summary ($(cat "$out/gpu.txt"))"
echo "-- state chain (go: <= 0.7 us per 32-token step; resident factors, no o stores = the chain alone)"
grep -E '^(variant|two-products|fused-output)' "$out/state_chain.log"
echo "-- factor build (go: <= 1.6 us per 32 tokens per SM)"
grep -E '^(variant|tanh gate|ex2\+rcp gate)' "$out/factor_build.log"
echo "-- factor build capped at ${FACTOR_REGS:-96} registers"
grep -E '^(tanh gate|ex2\+rcp gate)' "$out/factor_build_capped.log"
grep -hE 'ALL CHECKS|SOME CHECKS' "$out/state_chain.log" "$out/factor_build.log" "$out/factor_build_capped.log"
exit $status
