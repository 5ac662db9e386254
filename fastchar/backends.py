"""Which implementation runs where: availability checks and ``impl=`` resolution.

``fused`` picks the best fastchar kernel for the tensors' device (``cpp`` on
CPU, ``triton`` on CUDA) and falls back to ``reference`` with one warning per
reason; an explicit ``cpp`` or ``triton`` that cannot run raises RuntimeError.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings

import torch
from torch.autograd import forward_ad

IMPLS = ("fused", "cpp", "triton", "reference", "torch")

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the fastchar checkout "
    "(needs a C++ compiler and ninja)"
)


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as e:
        return str(e)
    return None


# Settled once at import, so that resolve() is plain Python that torch.compile can
# trace: loading the extension registers its ops; Triton is found without importing it.
_CPP_IMPORT_ERROR = _import_error("fastchar._C")
try:
    _TRITON_VERSION: str | None = importlib.metadata.version("triton")
except importlib.metadata.PackageNotFoundError:
    _TRITON_VERSION = None


def cpp_loaded() -> bool:
    """True when the C++ extension imported, which registers its ops."""
    return _CPP_IMPORT_ERROR is None


def triton_version() -> str | None:
    return _TRITON_VERSION


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def why_not(impl: str, device_type: str) -> str | None:
    """None when ``impl`` can run on ``device_type`` tensors, else the reason it cannot."""
    if impl in ("reference", "torch"):
        return None
    if impl == "cpp":
        if device_type != "cpu":
            return f"the C++ kernels run on CPU tensors only, not {device_type}"
        if _CPP_IMPORT_ERROR is None:
            return None
        return f"the C++ extension is not built ({_CPP_IMPORT_ERROR}); {BUILD_HINT}"
    if impl == "triton":
        if triton_version() is None:
            return "Triton is not installed (pip install triton)"
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device_type == "cpu":
            if interpreter_on():
                return None
            return (
                "Triton kernels need CUDA tensors; on CPU they run only under the "
                "Triton interpreter (set TRITON_INTERPRET=1 before starting Python)"
            )
        return f"Triton kernels do not run on {device_type} tensors"
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


# What a kernel impl does not run: a call that needs it goes to "reference" under "fused"
# (with the warning) and fails under the explicit impl.
FEATURES = ("proj_size",)
_LACKS = {"triton": {"proj_size": "the Triton kernels have no LSTM projection (proj_size)"}}

# The floating dtypes the C++ kernels run. torch.nn's CPU RNNs also run float16: under
# "fused" it goes to "reference" (with the warning), under "cpp" it fails, saying so.
CPP_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

_warned: set[str] = set()


def _why_not_feature(impl: str, feature: str | None) -> str | None:
    if feature is not None and feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    return _LACKS.get(impl, {}).get(feature) if feature is not None else None


def _why_not_transform(impl: str) -> str | None:
    """The kernels' backward formulas are torch.autograd's (torch.library.register_autograd),
    which torch.func's differentiating transforms (grad, jacrev, jvp, ...) cannot call: under
    one, a kernel impl would fail with functorch's error about setup_context. torch.func.vmap
    alone runs them. Nor has any of them a forward-mode formula (torch.autograd.forward_ad:
    while a dual level is open, its dual tensors would fail in them)."""
    if impl not in ("cpp", "triton"):
        return None
    if forward_ad._current_level >= 0:
        return "the kernels have no forward-mode gradient (a forward_ad dual level is open)"
    if not torch._C._are_functorch_transforms_active():
        return None
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    differentiating = [
        i.key().name
        for i in retrieve_all_functorch_interpreters()
        if i.key().name in ("Grad", "Jvp")
    ]
    if not differentiating:
        return None
    return (
        f"the kernels' gradients are torch.autograd's, which torch.func transforms "
        f"({', '.join(differentiating)}) cannot differentiate through"
    )


def _why_not_dtype(impl: str, dtype: torch.dtype | None) -> str | None:
    if impl != "cpp" or dtype is None or dtype in CPP_DTYPES:
        return None
    return f"the C++ kernels run float32, float64 and bfloat16, not {str(dtype)[6:]}"


def autocast_on(device: torch.device | str) -> bool:
    """Whether autocast is enabled for this device's type."""
    device_type = torch.device(device).type
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of ``dtype`` takes under autocast on this device: autocast's dtype
    where autocast is on and casts ``dtype`` (a floating type other than float64, which
    autocast leaves alone, as torch.nn's RNNs and matmuls run it), else ``dtype``."""
    if dtype.is_floating_point and dtype != torch.float64 and autocast_on(device):
        return torch.get_autocast_dtype(torch.device(device).type)
    return dtype


def resolve(
    impl: str,
    device: torch.device | str,
    feature: str | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Map ``impl`` to the concrete implementation that runs on ``device``; ``feature`` (one
    of FEATURES) names something the call needs that not every kernel has, ``dtype`` the
    dtype the layer computes in (None: any)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    device_type = torch.device(device).type
    if impl == "fused":
        kernel = {"cpu": "cpp", "cuda": "triton"}.get(device_type)
        reason = (
            f"no fastchar kernel for {device_type} tensors"
            if kernel is None
            else why_not(kernel, device_type)
            or _why_not_feature(kernel, feature)
            or _why_not_dtype(kernel, dtype)
            or _why_not_transform(kernel)
        )
        if reason is None:
            return kernel
        message = f"fastchar: impl='fused' falls back to 'reference' on {device_type}: {reason}"
        # (not while torch.compile traces: a graph cannot hold a warning; the next eager
        # call gives it)
        if not torch.compiler.is_compiling() and message not in _warned:
            _warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return "reference"
    reason = (
        why_not(impl, device_type)
        or _why_not_feature(impl, feature)
        or _why_not_dtype(impl, dtype)
        or _why_not_transform(impl)
    )
    if reason is not None:
        raise RuntimeError(f"impl={impl!r} cannot run on {device_type} tensors: {reason}")
    return impl
