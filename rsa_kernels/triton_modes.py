"""Import a folder of Triton kernels once per mode: compiled, or interpreted (TRITON_INTERPRET=1).

@triton.jit decides when it decorates whether a kernel is compiled or interpreted. The tests
run kernels interpreted on CPU tensors inside a suite that otherwise leaves the variable
unset, so each kernel folder is imported as a separate package per mode, named
``<package>._<folder>_<mode>``, and the mode is read at call time.
"""
from __future__ import annotations

import importlib
import os
import sys
import types


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_module(folder: str, package: str, module: str) -> types.ModuleType:
    """``module`` of the kernel ``folder`` (a directory path), imported for the current mode.

    ``package`` is the dotted package the folder lives in; the first call per mode creates
    the per-mode package, later ones find it in sys.modules.
    """
    import triton  # noqa: F401  (an ImportError here marks the kernels unavailable)

    mode = "interpret" if interpreting() else "compiled"
    name = f"{package}._{os.path.basename(folder)}_{mode}"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [folder]
        pkg.__package__ = name
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.{module}")


ROW_KERNELS = os.path.join(os.path.dirname(__file__), "backends", "triton")


def row_kernel_module(module: str) -> types.ModuleType:
    """A module of the row kernels' folder (rsa_kernels/backends/triton) in the current mode."""
    return kernel_module(ROW_KERNELS, "rsa_kernels.backends", module)
