"""Every instruction-set level of the C++ kernels that this CPU runs (rsa_kernels/extension.py),
for tests that check each level against the reference: ``use_level`` points the cpu backend and
its slice kernels at one level's module for the test."""
from __future__ import annotations

import pytest

from rsa_kernels import extension

LEVELS = extension.runnable_levels()


def use_level(level: str, monkeypatch) -> object:
    """Load the level (the package's build, or a first-use build) and make cpu_rows and
    cpu_slices use it; skips where it cannot be had (no compiler: the backend is absent)."""
    try:
        module = extension.load(level)
    except ImportError as err:
        pytest.skip(f"the {level} level of the cpu kernels is not available: {err}")
    from rsa_kernels.backends import cpu_rows, cpu_slices
    monkeypatch.setattr(cpu_rows, "_C", module)
    monkeypatch.setattr(cpu_slices, "_C", module)
    return module
