#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: the GPU tests, the benchmark table against
# cuDNN and the reference, and the Triton launch-variant timings. Installs nothing.
#
#   benchmarks/gpu.sh [--quick] [STEP ...]     STEP: info tests bench long model tune
#
# No STEP runs them all, in that order. Every Triton kernel specialisation compiles on
# first use (seconds each; the tests compile a few hundred): the tests run in parallel
# processes, and beside them a quarter of the cores compiles the kernels the timing
# steps will launch, so that Triton's disk cache (~/.triton/cache) serves them there.
# --quick cuts the repeats (and halves nothing else: the grid keeps its lengths, except
# in tune, where it is T/4).
#
# Results go to benchmarks/gpu-results/<UTC stamp>/: one log per step, tests*.xml,
# bench-*.json, tune-*.json and summary.json (each step's exit status and the
# environment). When OUT is set (a device runner's output folder) that folder is copied
# to $OUT/gpu-results-<stamp>/ after every step. Every step runs even if an earlier one fails; the exit status
# is non-zero when any failed. PYTHON picks the interpreter (default: .venv/bin/python
# if present, else python3). Each step is bounded in seconds by STEP_TIMEOUT_<step>
# (the step's name with '-' written '_': STEP_TIMEOUT_bench_bf16; STEP_TIMEOUT_warm
# bounds the compile-ahead) or else STEP_TIMEOUT (default 1500), so a hung kernel (a
# persistent grid whose barrier never opens) cannot eat the whole run, and the steps
# can be sized to fit one call of a device runner.
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_STEPS=(info tests bench long model tune)
GRID="32,128,64,256;64,128,128,512;1,256,64,256;8,256,64,512" # DESIGN section 5
QUICK=""
WANT=()
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK="--quick" ;;
        info | tests | bench | long | model | tune) WANT+=("$arg") ;;
        *)
            echo "usage: benchmarks/gpu.sh [--quick] [${ALL_STEPS[*]}]" >&2
            exit 2
            ;;
    esac
done
[[ ${#WANT[@]} -gt 0 ]] || WANT=("${ALL_STEPS[@]}")
wanted() { [[ " ${WANT[*]} " == *" $1 "* ]]; }
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ "${TRITON_INTERPRET:-}" == "1" ]]; then
    echo "benchmarks/gpu.sh: unset TRITON_INTERPRET; this script times the real kernels" >&2
    exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu.sh: no CUDA device visible to $PYTHON" >&2
    exit 2
fi

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
DIR="benchmarks/gpu-results/$STAMP"
mkdir -p "$DIR"
STEPS=()
failed=0

# With OUT set, every log and result so far is copied there after each step, so a call
# that a device runner ends at its limit still brings back what had finished.
to_out() {
    [[ -n "${OUT:-}" ]] || return 0
    mkdir -p "$OUT/gpu-results-$STAMP" && cp -r "$DIR"/. "$OUT/gpu-results-$STAMP/"
}

limit() {
    local var="STEP_TIMEOUT_${1//-/_}"
    echo "${!var:-${STEP_TIMEOUT:-1500}}"
}

step() {
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$(limit "$name")" "$@" >"$DIR/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$DIR/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    STEPS+=("$name=$rc=$((SECONDS - start))")
    [[ $rc -eq 0 ]] || failed=1
    to_out
}

if wanted info; then
    step info "$PYTHON" -m fastchar.info
    if command -v nvidia-smi >/dev/null; then step nvidia-smi nvidia-smi; fi
fi
if wanted tests; then
    # all of tests/triton runs on the GPU here: parity for every variant, then the
    # gpu-marked bf16/fp16/fp32 bounds vs cuDNN, persistent grids and CUDA graphs,
    # correctness only (no timing is taken here), in parallel processes: pytest-xdist
    # where it is installed, else one shard per group of files.
    start=$SECONDS
    cores=$(nproc)
    warm_pid=""
    if wanted bench || wanted long || wanted tune; then
        jobs=$((cores / 4 > 1 ? cores / 4 : 1))
        # timeout ends its whole process group, the compiling children too
        timeout "$(limit warm)" bash -c "
            '$PYTHON' benchmarks/gpu_tune.py --dtype bfloat16 --compile-only --jobs $jobs \
                --resident 0,8192,16384
            '$PYTHON' benchmarks/gpu_tune.py --dtype float32 --compile-only --jobs $jobs \
                --shapes '$GRID'
        " >"$DIR/warm.log" 2>&1 &
        warm_pid=$!
        cores=$((cores - jobs))
    fi
    per_test=()
    if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then per_test=(--timeout 150); fi
    pids=()
    names=()
    shard() {
        local name=$1
        shift
        timeout "$(limit tests)" "$PYTHON" -m pytest -q -p no:cacheprovider "${per_test[@]}" \
            --junitxml="$DIR/$name.xml" "$@" >"$DIR/$name.log" 2>&1 &
        pids+=($!)
        names+=("$name")
    }
    if "$PYTHON" -c "import xdist" 2>/dev/null; then
        shard tests tests/triton -n "$((cores > 2 ? cores - 1 : 1))"
    else
        shard tests-ops-lstm tests/triton/test_triton_ops.py -k lstm
        shard tests-ops-gru tests/triton/test_triton_ops.py -k gru
        shard tests-ops-rnn tests/triton/test_triton_ops.py -k rnn
        shard tests-ops-rest tests/triton/test_triton_ops.py -k "not lstm and not gru and not rnn"
        shard tests-gpu-lstm tests/triton/test_triton_gpu.py -k lstm
        shard tests-gpu-rest tests/triton/test_triton_gpu.py -k "not lstm"
        shard tests-packed tests/triton/test_triton_packed.py tests/triton/test_triton_packed_nn.py
        shard tests-rest tests/triton/test_triton_nn.py tests/triton/test_triton_dispatch.py \
            tests/triton/test_triton_plan.py tests/triton/test_triton_compile.py
    fi
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}"
        rc=$?
        echo "== ${names[$i]}: exit $rc"
        tail -n 30 "$DIR/${names[$i]}.log"
        STEPS+=("${names[$i]}=$rc=$((SECONDS - start))")
        [[ $rc -eq 0 ]] || failed=1
    done
    if [[ -n "$warm_pid" ]]; then
        wait "$warm_pid"
        echo "== warm: exit $? after $((SECONDS - start)) s (a compile-ahead: not a result)"
        tail -n 3 "$DIR/warm.log"
    fi
    to_out
fi
if wanted bench; then
    # full lengths; --quick only cuts the repeats
    step bench-bf16 "$PYTHON" benchmarks/run.py --device cuda --dtype bfloat16 --parts layers \
        --shapes "$GRID" $QUICK --json "$DIR/bench-bf16.json"
    step bench-fp32 "$PYTHON" benchmarks/run.py --device cuda --dtype float32 --parts layers \
        --shapes "$GRID" $QUICK --json "$DIR/bench-fp32.json"
fi
if wanted long; then
    # the long-sequence case of issue 5: B=16, T=1024, I=H=768, bfloat16
    step bench-long-bf16 "$PYTHON" benchmarks/run.py --device cuda --dtype bfloat16 \
        --parts layers --shapes "16,1024,768,768" $QUICK --json "$DIR/bench-long-bf16.json"
fi
if wanted model; then
    step bench-model "$PYTHON" benchmarks/run.py --device cuda --parts sample,train,memory \
        $QUICK --json "$DIR/bench-model.json"
fi
if wanted tune; then
    step tune-bf16 "$PYTHON" benchmarks/gpu_tune.py --dtype bfloat16 --jobs 12 $QUICK \
        --resident 0,8192,16384 --json "$DIR/tune-bf16.json"
    step tune-fp32 "$PYTHON" benchmarks/gpu_tune.py --dtype float32 --cells lstm --jobs 12 \
        $QUICK --json "$DIR/tune-fp32.json"
fi

"$PYTHON" - "$DIR" "${STEPS[@]}" <<'EOF'
import json, sys

sys.path.insert(0, "benchmarks")
import torch
import _harness

out, steps = sys.argv[1], sys.argv[2:]
summary = {
    "env": _harness.environment("cuda", torch.float32),
    "steps": {s.split("=")[0]: {"exit": int(s.split("=")[1]), "seconds": int(s.split("=")[2])}
              for s in steps},
}
with open(f"{out}/summary.json", "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary["steps"]))
EOF
echo "results in $DIR"
if [[ -n "${OUT:-}" ]]; then
    to_out
    echo "copied into $OUT/gpu-results-$STAMP"
fi
exit $failed
