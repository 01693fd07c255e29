"""The C++ kernels (csrc/) as compiled modules: which instruction-set level runs here, built
against the torch that runs (docs/cpu_backend.md "Building", docs/install.md).

The same sources are compiled once per level, each with its own flags, vector width and
namespace (csrc/simd.h): ``portable`` (the compiler's baseline for the target: any CPU),
``avx2`` (x86-64-v3: AVX2, FMA) and ``avx512`` (x86-64-v4: AVX-512 F/BW/CD/DQ/VL, 512-bit
vectors). The default is the highest level the CPU runs and torch's own kernels use
(``ATEN_CPU_CAPABILITY`` caps both); ``RSA_CPU_ISA=portable|avx2|avx512`` forces one (an
unknown value or a level the CPU cannot run is refused).

A level's module comes from the package when ``make install`` / ``pip install
--no-build-isolation`` built it against this very torch (setup.py records the version in
``_built.json``); otherwise it is compiled on first use with torch.utils.cpp_extension and
ninja into torch's extension cache, in a folder named after the torch version (so a build
for another torch is never loaded), under torch's file lock (parallel ranks build once).
This file is also read by setup.py on its own (no package imports here).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import shutil
import sys
import time

LEVELS = ("portable", "avx2", "avx512")
ENV = "RSA_CPU_ISA"
X86 = platform.machine().lower() in ("x86_64", "amd64")
# the /proc/cpuinfo flags each level's -march may use (the x86-64 psABI levels v3 and v4)
_NEEDS = {
    "portable": set(),
    "avx2": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
    "avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}
_MARCH = {"portable": [], "avx2": ["-march=x86-64-v3"], "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512"]}
_VEC_BYTES = {"portable": 32, "avx2": 32, "avx512": 64}
# -ffp-contract=off: forward and backward compute D (and the interpolated quantile) with the
# same roundings; the exp's FMAs are explicit intrinsics. No -std: torch's default applies.
# -g0: setup.py's compiler line carries Python's -g (11 MB per module, slower builds).
_COMMON = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-Wno-psabi"]
SOURCES = ("token_stats.cpp", "slices.cpp")
BUILT_INFO = "_built.json"  # setup.py: {"torch_version": ..., "levels": [...]} beside the modules it built


def built_levels() -> tuple:
    """The levels setup.py builds on this architecture."""
    return LEVELS if X86 else ("portable",)


def compile_args(level: str, torch_version: str) -> list:
    return _COMMON + _MARCH[level] + [f"-DRSA_ISA={level}", f"-DRSA_VEC_BYTES={_VEC_BYTES[level]}",
                                      f"-DRSA_TORCH_VERSION={torch_version}"]


def link_args() -> list:
    return ["-fopenmp"]


def cpu_flags() -> set | None:
    """The x86 feature flags of /proc/cpuinfo, or None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def runnable_levels() -> list:
    """The levels this CPU can execute, lowest first."""
    if not X86:
        return ["portable"]
    flags = cpu_flags()
    if flags is None:  # no /proc/cpuinfo (not Linux): torch's own detection decides
        cap = _torch_capability()
        return ["portable", "avx2", "avx512"][: {"DEFAULT": 1, "AVX2": 2, "AVX512": 3}.get(cap, 1)]
    out = ["portable"]
    for level in ("avx2", "avx512"):
        if not _NEEDS[level] <= flags:
            break
        out.append(level)
    return out


def _torch_capability() -> str:
    import torch
    try:
        return str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # noqa: BLE001 - an old torch: no cap
        return "AVX512"


def chosen_level() -> str:
    """RSA_CPU_ISA where set (checked), else the highest runnable level that torch also uses."""
    runnable = runnable_levels()
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        if forced not in LEVELS:
            raise ValueError(f"{ENV}: unknown level {forced!r}; expected one of {', '.join(LEVELS)}")
        if forced not in runnable:
            raise ValueError(f"{ENV}={forced}: this CPU cannot run that level (it runs {', '.join(runnable)})")
        return forced
    # torch's capability (ATEN_CPU_CAPABILITY lowers it): the kernels round as torch's do there
    cap = {"AVX512": "avx512", "AVX2": "avx2"}.get(_torch_capability(), "portable")
    allowed = LEVELS[: LEVELS.index(cap) + 1] if X86 else ("portable",)
    return [lv for lv in runnable if lv in allowed][-1]


def _package_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def sources_dir() -> str | None:
    """csrc/ shipped in the package (wheels), or the source tree's (editable installs)."""
    here = _package_dir()
    for d in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if all(os.path.exists(os.path.join(d, s)) for s in SOURCES):
            return d
    return None


def _prebuilt(level: str, torch_version: str):
    """The package's module for the level, where it was built against this torch; else None."""
    try:
        with open(os.path.join(_package_dir(), BUILT_INFO)) as f:
            built = json.load(f)
    except (OSError, ValueError):
        return None
    if built.get("torch_version") != torch_version or level not in built.get("levels", ()):
        return None
    try:
        return importlib.import_module(f"{__package__}._C_{level}")
    except ImportError:
        return None


def build_directory(level: str, torch_version: str) -> str:
    """Where the first-use build of a level goes: torch's extension cache, one folder per
    Python and torch version (TORCH_EXTENSIONS_DIR moves it, as for any torch extension)."""
    from torch.utils.cpp_extension import get_default_build_root
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch_version.replace('+', '_')}"
    return os.path.join(root, tag, f"rsa_kernels_{level}")


def build(level: str):
    """Compile the level against the running torch (or load an earlier such build)."""
    import torch
    from torch.utils.cpp_extension import is_ninja_available, load
    version = torch.__version__
    src = sources_dir()
    if src is None:
        raise ImportError("the C++ sources (csrc/) are not installed with the package, so the cpu kernels "
                          "cannot be built for this torch")
    cxx = os.environ.get("CXX", "c++")
    if not shutil.which(cxx):
        raise ImportError(f"no C++ compiler ({cxx}) to build the cpu kernels for torch {version}; install one "
                          "(e.g. g++) or set CXX")
    if not is_ninja_available():
        raise ImportError("ninja is needed to build the cpu kernels (pip install ninja)")
    out = build_directory(level, version)
    os.makedirs(out, exist_ok=True)
    name = f"rsa_kernels_{level}"
    with _lock(os.path.join(out, "rsa_kernels.lock")):  # parallel ranks: one builds, the others wait
        fresh = not os.path.exists(os.path.join(out, f"{name}.so"))
        t0 = time.perf_counter()
        if fresh:
            print(f"rsa-kernels: compiling the C++ kernels ({level}) for torch {version} into {out} "
                  "(once; a minute or two)...", file=sys.stderr, flush=True)
        try:
            module = load(name, [os.path.join(src, s) for s in SOURCES], extra_cflags=compile_args(level, version),
                          extra_ldflags=link_args(), build_directory=out, verbose=False)
        except Exception as err:  # noqa: BLE001 - a compiler error: the torch backend takes over
            last = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
            raise ImportError(f"building the cpu kernels ({level}) for torch {version} failed in {out}: {last}") from err
        if fresh:
            print(f"rsa-kernels: built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return module


@contextlib.contextmanager
def _lock(path: str):
    """An exclusive lock on a file (released by the kernel if the holder dies, unlike a lock
    file's existence); no lock where fcntl is missing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load(level: str | None = None, prebuilt: bool = True):
    """The compiled module of ``level`` (default: chosen_level()). ImportError says why there is
    none (no compiler, a failed build); ValueError for a bad RSA_CPU_ISA or an unrunnable level."""
    import torch
    level = level or chosen_level()
    if level not in runnable_levels():
        raise ValueError(f"level {level!r}: this CPU cannot run it (it runs {', '.join(runnable_levels())})")
    module = (_prebuilt(level, torch.__version__) if prebuilt else None) or build(level)
    if module.TORCH_VERSION != torch.__version__ or module.LEVEL != level:  # never use a mismatched build
        raise ImportError(f"the cpu kernels at {module.__file__} are {module.LEVEL} for torch "
                          f"{module.TORCH_VERSION}, not {level} for torch {torch.__version__}")
    return module
