"""Builds the optional C++ extension ``fastchar._C`` from ``csrc/``.

The extension is optional: when torch's build helpers are missing, no compiler
is found, or the compile fails, the pure-Python package still installs and
``impl="fused"`` falls back to the reference path with a warning.
Set ``FASTCHAR_NO_EXT=1`` to skip the build on purpose.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("FASTCHAR_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch absent at build time: Python-only install
        print(f"fastchar: not building the C++ extension ({e})", file=sys.stderr)
        return [], {}

    class OptionalBuildExt(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as e:
                self._skip(e)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                self._skip(e)

        @staticmethod
        def _skip(e):
            print(
                f"fastchar: WARNING: the C++ extension failed to build ({e}); "
                "installing the pure-Python package, impl='fused' will fall back",
                file=sys.stderr,
            )

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CppExtension(
        "fastchar._C",
        sources,
        # The gate passes must vectorise for AVX2 too. Python's own CFLAGS bring -fwrapv,
        # under which GCC cannot prove their int64 indexing affine; and with trapping math
        # GCC will not if-convert the activations' clamps without AVX-512's masks. Either
        # left the AVX2 clone scalar (the LSTM forward's gate pass ~8x slower on an AVX2
        # EPYC). The kernels never read floating-point exception flags.
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17", "-fno-wrapv", "-fno-trapping-math"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
