#!/usr/bin/env bash
# Runs the test suite: the main suite (with a CUDA device, tests/triton on the GPU too),
# then the Triton kernels under the interpreter in a process of their own
# (TRITON_INTERPRET must be set before the kernels are defined).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

"$PY" -m pytest tests -q "$@"

if "$PY" -c "import triton" 2>/dev/null; then
    # On CPU tensors, as CI runs it: on a machine with a GPU the main run above has already
    # run tests/triton on the real kernels, and the interpreter cannot take part in CUDA
    # graph capture, so it does not see the GPU.
    CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 "$PY" -m pytest tests/triton -q "$@"
else
    echo "test: Triton is not installed on this platform; the Triton interpreter tests did not run" >&2
fi
