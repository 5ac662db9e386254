"""The package's shape: files of one job and a readable size, no import circle between the
ops and the Triton kernels, nothing that reaches outside the package for its data, and
the C++ extension built wherever a compiler is."""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import pytest

from fastchar.backends import cpp_loaded, why_not

PACKAGE = Path(__file__).resolve().parent.parent / "fastchar"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_extension_is_built_where_a_compiler_is():
    """With a C++ compiler here, an extension that did not build (a csrc/ that does not
    compile) is a failure, not the no-compiler fallback: its tests would all skip."""
    compiler = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension runs
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}): this machine runs the reference fallback")
    assert cpp_loaded(), why_not("cpp", "cpu")


def test_sources_found():
    assert len(SOURCES) > 20 and PACKAGE / "training" / "cli.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_python_file_over_500_lines(path):
    assert len(path.read_text().splitlines()) <= 500


@pytest.mark.parametrize("path", sorted((PACKAGE / "triton").glob("*.py")), ids=lambda p: p.name)
def test_triton_kernels_do_not_import_the_ops(path):
    assert not any(n == "fastchar.ops" or n.startswith("fastchar.ops.") for n in _imports(path))


def test_sampling_does_not_depend_on_the_training_cli():
    names = _imports(PACKAGE / "sample.py")
    cli = ("fastchar.train", "fastchar.training.cli", "fastchar.training.loop")
    assert not any(n in cli or n.startswith(tuple(m + "." for m in cli)) for n in names)
    assert "fastchar.training.checkpoint" in names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_refers_to_the_repositorys_shared_folder(path):
    text = path.read_text()
    assert '"shared"' not in text and "'shared'" not in text and "../shared" not in text
