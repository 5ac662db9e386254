"""The GPU-only launch variant (persistent grid barrier) and a loop/step sample, dense
and packed, compiled for sm_90 with Triton's bundled ptxas, in a child process without
the interpreter: CPU-only CI cannot run them, but it can see that they lower."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="with a GPU the kernels compile and run for real"
)
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = os.path.join(ROOT, "tests", "triton", "_compile_sm90.py")
    result = subprocess.run(
        [sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok   ") == 22, result.stdout


def _jit_functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(
            ast.unparse(d).startswith(("triton.jit", "jit")) for d in node.decorator_list
        ):
            yield node


def test_no_constexpr_parameter_has_a_string_default():
    """Triton 3.6 (the GPU machines' version) cannot compile a jitted function whose
    ``tl.constexpr`` parameter defaults to a string (``CM: tl.constexpr = ""`` failed
    with "'str' object has no attribute 'type'"); newer Triton accepts it, so only this
    scan sees it on CI."""
    found = []
    for name in ("_tiles", "lstm", "gru", "rnn"):
        path = os.path.join(ROOT, "fastchar", "triton", f"{name}.py")
        with open(path) as f:
            tree = ast.parse(f.read())
        jitted = list(_jit_functions(tree))
        assert jitted, f"no @triton.jit function found in {path}"
        for fn in jitted:
            args, defaults = fn.args.args, fn.args.defaults
            for arg, default in zip(args[len(args) - len(defaults) :], defaults, strict=True):
                is_str = isinstance(default, ast.Constant) and isinstance(default.value, str)
                hint = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if is_str and "constexpr" in hint:
                    found.append(f"{name}.{fn.name}({arg.arg}={default.value!r})")
    assert not found, found
