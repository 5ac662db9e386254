#!/usr/bin/env bash
# Creates .venv with torch, fastchar (editable, with its C++ extension) and the dev
# tools. Safe to re-run: it only reinstalls fastchar when its build inputs changed.
# On a machine without an NVIDIA GPU it never pulls a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC=${FASTCHAR_TORCH:-torch==2.13.0}
PY=${PYTHON:-python3}
VENV=.venv
PIP="$VENV/bin/pip --disable-pip-version-check"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # Which torch file would pip take? A CPU-only machine must not get the CUDA build.
    chosen=$($PIP install --dry-run --quiet --report - "$TORCH_SPEC" 2>/dev/null |
        "$VENV/bin/python" -c "import json,sys; print(next(i['metadata']['version'] for i in json.load(sys.stdin)['install'] if i['metadata']['name'] == 'torch'))" ||
        echo unknown)
    if command -v nvidia-smi >/dev/null 2>&1 || [[ "$chosen" == *+cpu ]]; then
        $PIP install -q "$TORCH_SPEC"
    else
        echo "setup: no NVIDIA GPU; installing the CPU build of torch" >&2
        $PIP install -q "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu
    fi
fi

stamp="$VENV/.fastchar-installed"
inputs=(setup.py pyproject.toml csrc/*)
if [ ! -f "$stamp" ] || [ -n "$(find "${inputs[@]}" -newer "$stamp" 2>/dev/null)" ]; then
    $PIP install -q "setuptools>=64" wheel ninja
    # --no-build-isolation: the extension must build against the torch just installed
    $PIP install -q --no-build-isolation -e ".[dev]"
    touch "$stamp"
fi

if "$VENV/bin/python" -c "import torch, fastchar._C" 2>/dev/null; then
    echo "setup: fastchar installed with its C++ extension"
else
    echo "setup: WARNING: fastchar installed without its C++ extension; impl='fused' will fall back" >&2
fi
