#!/usr/bin/env bash
# One session on a lent Hopper GPU (see ../.library/device): install the carried wheels (.whl/), build
# jax_kda with its kernels, then run what is asked, in any order: `test` (the GPU test suite; TESTS,
# PYTEST_ARGS, TEST_TIMEOUT, TEST_WORKERS), `bench` (the prefill benchmark; BENCH_ARGS are passed to
# it), `profile` (Nsight Compute on one kernel of one case, and its stall reasons; PROFILE_KERNEL,
# PROFILE_CASE),
# `decode` (generation with the notebook's model, and the decode step, XLA and the kernel, against its
# bytes; DECODE_ARGS), `segments` (time and error against the number of segments; SWEEP_ARGS),
# `profile-decode` (Nsight Compute on the decode kernel; PROFILE_DECODE_ARGS e.g. "k-first bfloat16"),
# `harness` (the two-pass harness, benchmarks/kernel_next/run_two_pass.sh, its logs archived),
# `sharded` (time against the number of GPUs), `notebook` (runs NOTEBOOK in a Jupyter kernel, returned
# with outputs), `kernel-times` (each kernel's device time, KT_ARGS, e.g. "--cases ACD --calls 10"; with
# BASELINE, source trees such as `git archive main` unpacked in an ignored and carried folder, each
# built beside this one, in parallel, and timed after it in the same call: A/Bs on one card; CLOCKS=1
# adds the SM clock and power while each tree's run kept the GPU busy).
# PREBUILT_WHEELS=/tmp/jax_kda_wheel, on a machine still warm from a call that built this tree, installs
# that call's wheel instead of building. Logs, the benchmark tables (JSON) and plot go to $OUT.
#   BENCH_ARGS="--cases AEF" bash benchmarks/gpu_session.sh test bench
#   TESTS=tests/test_sharding_gpu.py NOTEBOOK=sharded_prefill bash benchmarks/gpu_session.sh test sharded notebook
#   TESTS="tests/test_decode_cuda.py tests/test_flax_layer.py" bash benchmarks/gpu_session.sh test
#   TESTS=tests/test_cuda.py PYTEST_ARGS="-k 'non_finite or packed'" bash benchmarks/gpu_session.sh test
#   BASELINE=".ab/main .ab/fold:IJ" KT_ARGS="--cases ACD" bash benchmarks/gpu_session.sh kernel-times
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/out}
mkdir -p "$out"

if compgen -G "$repo/.whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$repo"/.whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
start=$(date +%s)
# BASELINE's trees (kernel-times) build in the background beside this one: one tree's four kernel
# translation units leave most of the machine's cores idle.
baseline_site() { echo "/tmp/site_$(basename "$1")"; }
baseline_builds=()
[[ " $* " == *" kernel-times "* ]] || BASELINE=""  # only that step times them
for entry in ${BASELINE:-}; do
  tree=${entry%%:*}
  [[ -d $(baseline_site "$tree") ]] && continue
  JAX_KDA_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps --target "$(baseline_site "$tree")" \
    "$repo/$tree" > "$out/build_$(basename "$tree").log" 2>&1 &
  baseline_builds+=($!)
done
# This tree's wheel stays in /tmp/jax_kda_wheel: a later call on the same warm machine passes
# PREBUILT_WHEELS=/tmp/jax_kda_wheel and saves the build.
if [[ -n "${PREBUILT_WHEELS:-}" ]] && compgen -G "$PREBUILT_WHEELS/jax_kda-*.whl" > /dev/null; then
  wheels=$PREBUILT_WHEELS
  echo "installing the prebuilt wheel"
else
  wheels=/tmp/jax_kda_wheel
  rm -rf "$wheels"
  JAX_KDA_CUDA=1 python3 -m pip wheel -q --no-build-isolation --no-deps -w "$wheels" "$repo" > "$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log"; exit 1; }
fi
python3 -m pip install -q --no-index --no-deps --force-reinstall "$wheels"/jax_kda-*.whl >> "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"

status=0
for step in "$@"; do
  case "$step" in
    test)
      read -r -a targets <<< "${TESTS:-tests}"  # one or more test files or folders, from the repository root
      eval "selection=(${PYTEST_ARGS:-})"  # shell words, quotes kept: PYTEST_ARGS="-k 'non_finite or cut'"
      # -v: a run cut off by TEST_TIMEOUT (seconds; 0: none) or the call's limit still names what passed.
      # TEST_WORKERS processes (pytest-xdist, default 8; 0: one process) share the GPU: the float64
      # references on the host's cores, one test at a time, took most of a test call (ninth session).
      workers=()
      python3 -c "import xdist" 2> /dev/null && workers=(-n "${TEST_WORKERS:-8}")
      (cd /tmp && timeout "${TEST_TIMEOUT:-0}" python3 -m pytest -v -m gpu -p no:cacheprovider --durations=8 \
        "${workers[@]}" "${selection[@]}" "${targets[@]/#/$repo/}" 2>&1 \
        | tee "$out/gpu_tests.log" \
        | tail -25) || status=1 ;;
    harness)  # the two-pass harness (benchmarks/kernel_next/run_two_pass.sh: checks, timings, phase
      # clocks; HARNESS_LIMIT seconds, default 300), its eight logs in one archive (a call returns 8 files)
      timeout "${HARNESS_LIMIT:-300}" env OUT="$out/harness" BUILD_DIR=/tmp/two_pass_build \
        bash "$repo/benchmarks/kernel_next/run_two_pass.sh" > "$out/harness_stdout.log" 2>&1 || status=1
      tar -czf "$out/harness.tar.gz" -C "$out" harness harness_stdout.log && rm -rf "$out/harness" "$out/harness_stdout.log"
      tar -xzOf "$out/harness.tar.gz" harness/summary.txt 2> /dev/null | grep -vE "^check .*PASS$" | tail -60 ;;
    bench)
      (cd /tmp && python3 "$repo/benchmarks/bench_prefill.py" --json "$out/bench.json" --plot "$out/bench.png" \
        ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log" | tail -20) || status=1 ;;
    profile)  # Nsight Compute on the third launch of one kernel (PROFILE_KERNEL, a name regex, default the
      # chunk-16 kernel; e.g. factor_pass_kernel) in one case (PROFILE_CASE, default F); then its warps'
      # stall reasons, cycles per issued instruction (instruction fetch: "no_instruction")
      (cd "$repo/benchmarks" && ncu --clock-control none -k "regex:${PROFILE_KERNEL:-kda_prefill_kernel}" \
        --launch-skip 2 --launch-count 1 \
        --set full --import-source yes -f -o "$out/prefill" python3 profile_prefill.py "${PROFILE_CASE:-F}" \
        > "$out/ncu.log" 2>&1 && ncu -i "$out/prefill.ncu-rep" --print-details all > "$out/ncu_details.txt" 2>&1 \
        && ncu -i "$out/prefill.ncu-rep" --page raw --csv > "$out/ncu_raw.csv" 2>&1 \
        && ncu -i "$out/prefill.ncu-rep" --page source --csv --print-source sass > "$out/ncu_source.csv" 2>&1) \
        || { tail -20 "$out/ncu.log"; status=1; }
      grep -E "Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput|Memory Throughput" \
        "$out/ncu_details.txt" | head -12
      python3 - "$out/ncu_raw.csv" <<'STALLS'
import csv, sys
header, units, values = list(csv.reader(open(sys.argv[1])))[:3]
prefix, suffix = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"
stalls = {h[len(prefix):-len(suffix)]: float(v) for h, v in zip(header, values)
          if h.startswith(prefix) and h.endswith(suffix) and v.replace(".", "", 1).isdigit()}
print("stalls, cycles per issued instruction:", ", ".join(f"{k} {v:.2f}" for k, v in
      sorted(stalls.items(), key=lambda kv: -kv[1])[:8]))
STALLS
      python3 "$repo/benchmarks/ncu_hotspots.py" "$out/ncu_source.csv" 2>&1 | tee "$out/ncu_hotspots.txt" | head -40
      ;;
    profile-decode)  # Nsight Compute on the third decode-kernel launch
      (cd "$repo/benchmarks" && ncu --clock-control none -k regex:decode_kernel --launch-skip 2 --launch-count 1 \
        --set full --import-source yes -f -o "$out/decode" python3 profile_decode.py ${PROFILE_DECODE_ARGS:-} \
        > "$out/ncu_decode.log" 2>&1 && ncu -i "$out/decode.ncu-rep" --print-details all \
        > "$out/ncu_decode_details.txt" 2>&1) || { tail -20 "$out/ncu_decode.log"; status=1; }
      grep -E "Duration|Registers Per|Achieved Occupancy|DRAM Throughput|Memory Throughput" \
        "$out/ncu_decode_details.txt" | head -12 ;;
    sharded)
      (cd /tmp && python3 "$repo/benchmarks/bench_sharded.py" --json "$out/sharded.json" 2>&1 | tee "$out/sharded.log" \
        | tail -12) || status=1 ;;
    segments)  # time and error against the number of segments (issue 14); SWEEP_ARGS are passed to it
      (cd /tmp && python3 "$repo/benchmarks/sweep_segments.py" --json "$out/segments.json" ${SWEEP_ARGS:-} 2>&1 \
        | tee "$out/segments.log" | tail -34) || status=1 ;;
    decode)
      (cd /tmp && python3 "$repo/benchmarks/bench_decode.py" ${DECODE_ARGS:-} 2>&1 | tee "$out/decode.log" \
        | tail -16) || status=1 ;;
    notebook)  # runs NOTEBOOK (default kimi_linear_prefill) in a Jupyter kernel, returned with its outputs
      # From /tmp the kernel imports the jax_kda just installed, with its kernels. nbclient, ipykernel and
      # their dependencies are not in the image: carry them as wheels (.whl/).
      python3 -c "import nbclient, ipykernel" || { echo "notebook: carry nbclient and ipykernel wheels"; status=1; continue; }
      nb=${NOTEBOOK:-kimi_linear_prefill}.ipynb
      cp "$repo/notebooks/$nb" "$out/$nb"
      (cd /tmp && python3 "$repo/notebooks/run_notebook.py" "$out/$nb" --write 2>&1 | tee "$out/notebook.log" \
        | tail -12) || status=1 ;;
    kernel-times)  # this tree, then each of BASELINE's (space-separated; "tree:CASES" times those cases)
      : > "$out/kernel_times.log"
      (( ${#baseline_builds[@]} )) && wait "${baseline_builds[@]}"
      baseline_builds=()
      for entry in this ${BASELINE:-}; do
        tree=${entry%%:*} cases=""
        [[ $entry == *:* ]] && cases="--cases ${entry#*:}"
        site=${PYTHONPATH:-}
        if [[ $tree != this ]]; then
          site=$(baseline_site "$tree")
          [[ -f $site/jax_kda/__init__.py ]] || { echo "== $tree: build failed (build_$(basename "$tree").log)"; status=1; continue; }
          site=$site${PYTHONPATH:+:$PYTHONPATH}
        fi
        echo "== $entry" >> "$out/kernel_times.log"
        clocks=$out/clocks_$(basename "$tree").csv  # CLOCKS=1: the SM clock and power every 20 ms meanwhile
        [[ -n ${CLOCKS:-} ]] && { nvidia-smi --query-gpu=utilization.gpu,clocks.sm,power.draw --format=csv,noheader,nounits \
          -lms 20 > "$clocks" & sampler=$!; }
        (cd /tmp && PYTHONPATH=$site python3 "$repo/benchmarks/kernel_times.py" ${KT_ARGS:-} $cases \
          >> "$out/kernel_times.log" 2>&1) || status=1
        if [[ -n ${CLOCKS:-} ]]; then  # while the GPU was busy (utilization >= 90%): SM clock, power
          kill "$sampler"
          sort -t, -k2,2n "$clocks" | awk -F', *' '$1 >= 90 {c[n++] = $2; p = $3 > p ? $3 : p}
            END {if (n) printf "   SM clock busy: median %d MHz, min %d, max %d; power max %.0f W (%d samples)\n",
                 c[int(n / 2)], c[0], c[n - 1], p, n}' >> "$out/kernel_times.log"
        fi
      done
      grep -E "^==|^case|sum per call|ms |SM clock" "$out/kernel_times.log" | cut -c1-110 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $status
