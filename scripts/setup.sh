#!/usr/bin/env bash
# Creates .venv with torch, fastchar (editable, with its C++ extension) and the dev
# tools. Safe to re-run: it only reinstalls fastchar when its build inputs changed (or
# its extension did not build), and it recreates a .venv that is broken (no pip, its
# Python gone) or older than Python 3.10.
# On a machine without an NVIDIA GPU it never pulls a CUDA build of torch.
# PYTHON=python3.12 picks the interpreter (default: python3, else the newest python3.1x);
# FASTCHAR_TORCH=torch==X.Y.Z the torch to install.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC=${FASTCHAR_TORCH:-torch==2.13.0}
VENV=.venv
PIP="$VENV/bin/python -m pip --disable-pip-version-check"

recent() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
    recent "$PY" || { echo "setup: PYTHON=$PY is not a Python >= 3.10" >&2; exit 1; }
else
    PY=
    for candidate in python3 python3.14 python3.13 python3.12 python3.11 python3.10; do
        if command -v "$candidate" >/dev/null 2>&1 && recent "$candidate"; then
            PY=$candidate
            break
        fi
    done
    [ -n "$PY" ] || { echo "setup: fastchar needs Python >= 3.10 (set PYTHON=...)" >&2; exit 1; }
fi

if ! { recent "$VENV/bin/python" && $PIP --version >/dev/null 2>&1; }; then
    [ ! -e "$VENV" ] || echo "setup: $VENV is broken or older than Python 3.10; recreating it" >&2
    "$PY" -m venv --clear "$VENV"
fi
export PATH="$PWD/$VENV/bin:$PATH" # torch finds ninja (installed below) on PATH only

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # Which torch file would pip take? A CPU-only machine must not get the CUDA build.
    chosen=$($PIP install --dry-run --no-deps --quiet --report - "$TORCH_SPEC" 2>/dev/null |
        "$VENV/bin/python" -c "import json,sys; print(next(i['metadata']['version'] for i in json.load(sys.stdin)['install'] if i['metadata']['name'] == 'torch'))" 2>/dev/null ||
        echo unknown)
    if command -v nvidia-smi >/dev/null 2>&1 || [[ "$chosen" == *+cpu ]]; then
        $PIP install -q "$TORCH_SPEC"
    else
        echo "setup: no NVIDIA GPU; installing the CPU build of torch" >&2
        spec=$TORCH_SPEC
        # torch==X also matches a CUDA build X+cu126 that an extra index (PIP_EXTRA_INDEX_URL,
        # pip.conf) offers, and that one sorts first: ask for the CPU build by name.
        if [[ "$spec" =~ ^torch==[0-9.]+$ && "$(uname -m)" == x86_64 ]]; then
            spec="$spec+cpu"
        fi
        $PIP install -q "$spec" --index-url https://download.pytorch.org/whl/cpu
    fi
fi

stamp="$VENV/.fastchar-installed"
inputs=(setup.py pyproject.toml csrc/*)
built() { "$VENV/bin/python" -c "import torch, fastchar._C" 2>/dev/null && echo yes || echo no; }
extension=$(built)
if [ ! -f "$stamp" ] || [ -n "$(find "${inputs[@]}" -newer "$stamp" 2>/dev/null)" ] ||
    [ "$extension" = no ]; then
    $PIP install -q "setuptools>=77" wheel ninja
    rm -f fastchar/_C.*.so # a build that fails must not leave the last one's in its place
    # --no-build-isolation: the extension must build against the torch just installed.
    # The build's output (a compiler error) goes to a log, shown where the build failed.
    $PIP install -v --no-build-isolation -e ".[dev]" >"$VENV/build.log" 2>&1 || {
        tail -n 30 "$VENV/build.log" >&2
        echo "setup: installing fastchar failed; the whole log is $VENV/build.log" >&2
        exit 1
    }
    touch "$stamp"
    extension=$(built)
fi

if [ "$extension" = yes ]; then
    echo "setup: fastchar installed with its C++ extension"
else
    grep -E -m 5 "error|Error" "$VENV/build.log" >&2 2>/dev/null || true
    echo "setup: WARNING: fastchar installed without its C++ extension; impl='fused' will" \
        "fall back (the build's log: $VENV/build.log)" >&2
fi
