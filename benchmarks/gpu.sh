#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: the GPU tests, the Triton launch-variant
# timings and the benchmark table against cuDNN. Installs nothing.
#
#   benchmarks/gpu.sh [--quick] [STEP ...]     STEP: info tests tune bench long model
#
# No STEP runs them all, in that order. Every Triton kernel specialisation compiles
# on first use (seconds each, tests compile a few hundred), so where one call is
# limited to ~10 minutes run it in parts on the same warm machine, which keeps
# Triton's compile cache (~/.triton/cache):  gpu.sh info tests;  gpu.sh tune;
# gpu.sh bench long model.
#
# Results go to benchmarks/gpu-results/<UTC stamp>/: one log per step, tests-*.xml,
# tune-*.json, bench-*.json and summary.json (each step's exit status and the
# environment). When OUT is set (a device runner's output folder, which takes back
# only a few files) that folder is also packed into $OUT/gpu-results-<stamp>.tar.gz,
# with summary.json beside it. Every step runs even if an earlier one fails; the exit status is
# non-zero when any failed. PYTHON picks the interpreter (default: .venv/bin/python if
# present, else python3); STEP_TIMEOUT bounds each step in seconds (default 1500), so a
# hung kernel (a persistent grid whose barrier never opens) cannot eat the whole run.
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_STEPS=(info tests tune bench long model)
QUICK=""
WANT=()
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK="--quick" ;;
        info | tests | tune | bench | long | model) WANT+=("$arg") ;;
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

step() {
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    timeout "${STEP_TIMEOUT:-1500}" "$@" >"$DIR/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$DIR/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    STEPS+=("$name=$rc=$((SECONDS - start))")
    [[ $rc -eq 0 ]] || failed=1
}

if wanted info; then
    step info "$PYTHON" -m fastchar.info
    if command -v nvidia-smi >/dev/null; then step nvidia-smi nvidia-smi; fi
fi
if wanted tests; then
    # all of tests/triton runs on the GPU here: parity for every variant, then the
    # gpu-marked bf16/fp16/fp32 bounds vs cuDNN, persistent grids and CUDA graphs. Triton
    # compiles each kernel on one core and these tests need a few hundred, so the suite
    # runs as parallel shards (correctness only: no timing is taken here).
    pids=()
    names=()
    start=$SECONDS
    shard() {
        local name=$1
        shift
        timeout "${STEP_TIMEOUT:-1500}" "$PYTHON" -m pytest -q -p no:cacheprovider \
            --junitxml="$DIR/$name.xml" "$@" >"$DIR/$name.log" 2>&1 &
        pids+=($!)
        names+=("$name")
    }
    shard tests-ops-lstm tests/triton/test_triton_ops.py -k lstm
    shard tests-ops-gru tests/triton/test_triton_ops.py -k gru
    shard tests-ops-rnn tests/triton/test_triton_ops.py -k rnn
    shard tests-ops-rest tests/triton/test_triton_ops.py -k "not lstm and not gru and not rnn"
    shard tests-gpu-lstm tests/triton/test_triton_gpu.py -k lstm
    shard tests-gpu-rest tests/triton/test_triton_gpu.py -k "not lstm"
    shard tests-rest tests/triton/test_triton_nn.py tests/triton/test_triton_dispatch.py \
        tests/triton/test_triton_plan.py tests/triton/test_triton_compile.py
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}"
        rc=$?
        echo "== ${names[$i]}: exit $rc"
        tail -n 15 "$DIR/${names[$i]}.log"
        STEPS+=("${names[$i]}=$rc=$((SECONDS - start))")
        [[ $rc -eq 0 ]] || failed=1
    done
fi
if wanted tune; then
    step tune-bf16 "$PYTHON" benchmarks/gpu_tune.py --dtype bfloat16 --jobs 12 $QUICK \
        --resident 0,8192,16384 --json "$DIR/tune-bf16.json"
    step tune-fp32 "$PYTHON" benchmarks/gpu_tune.py --dtype float32 --cells lstm --jobs 12 \
        $QUICK --json "$DIR/tune-fp32.json"
fi
if wanted bench; then
    step bench-fp32 "$PYTHON" benchmarks/run.py --device cuda --dtype float32 --parts layers \
        $QUICK --json "$DIR/bench-fp32.json"
    step bench-bf16 "$PYTHON" benchmarks/run.py --device cuda --dtype bfloat16 --parts layers \
        $QUICK --json "$DIR/bench-bf16.json"
fi
if wanted long; then
    # the long-sequence case of issue 5: B=16, T=1024, I=H=768, bfloat16
    step bench-long-bf16 "$PYTHON" benchmarks/run.py --device cuda --dtype bfloat16 \
        --parts layers --shapes "16,1024,768,768" --json "$DIR/bench-long-bf16.json"
fi
if wanted model; then
    step bench-model "$PYTHON" benchmarks/run.py --device cuda --parts sample,train,memory \
        $QUICK --json "$DIR/bench-model.json"
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
    mkdir -p "$OUT"
    tar czf "$OUT/gpu-results-$STAMP.tar.gz" -C benchmarks/gpu-results "$STAMP"
    cp "$DIR/summary.json" "$OUT/summary-$STAMP.json"
    echo "packed into $OUT/gpu-results-$STAMP.tar.gz"
fi
exit $failed
