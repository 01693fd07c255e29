"""The package as users install it (docs/install.md): the sdist carries csrc/, a wheel built from
it carries every level of the C++ kernels and csrc/, and installed into a fresh venv the kernels
load and agree with the reference; a package installed without them compiles them on first use
(once, under a lock, into torch's extension cache), never loads a build made for another torch,
and without a compiler warns once and runs the torch backend.

The fresh venvs have no site packages of their own but torch: a .pth line puts this venv's
site-packages (torch, numpy) after theirs, so torch is not installed again (2 GB, minutes)
while rsa_kernels comes only from what the test installs (this venv's copy is an editable
install, whose path hook a .pth-added folder does not run). Slow: the wheel compiles the
three levels (about 2 CPU minutes), the first-use build one (about 30 CPU seconds).
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

if not shutil.which(os.environ.get("CXX", "c++")):
    pytest.skip("no C++ compiler", allow_module_level=True)

# run inside the fresh venv: where _C came from, its level and torch, and a check against the reference
CHECK = r"""
import json, sys, torch
import rsa_kernels, rsa_kernels._C as C
from rsa_kernels import reference
from rsa_kernels.backends import cpu_rows
g = torch.Generator().manual_seed(0)
z = torch.randn(6, 3001, generator=g, dtype=torch.float64) * 3
zr = z + torch.randn(6, 3001, generator=g, dtype=torch.float64)
labels = torch.randint(0, 3001, (6,), generator=g)
worst = 0.0
for risk in ("kl", "erm:1", "cvar:0.9", "ra_dpo_cvar:0.95"):
    zz = z.clone().requires_grad_()
    got = rsa_kernels.token_stats(zz, zr, labels, risk=risk, backend="cpu")
    (got.risk.sum() + got.kl.sum()).backward()
    z64 = z.clone().requires_grad_()
    want = reference.token_stats(z64, zr, labels, risk=risk)
    (want[3].sum() + want[2].sum()).backward()
    worst = max(worst, (got.risk - want[3]).abs().max().item(), (zz.grad - z64.grad).abs().max().item())
print(json.dumps({"file": C.MODULE.__file__, "level": C.LEVEL, "torch": C.TORCH_VERSION,
                  "runtime_torch": torch.__version__, "package": rsa_kernels.__file__, "worst": worst}))
"""


def run(cmd, env=None, **kw):  # noqa: D103
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def fresh_venv(path: Path) -> Path:
    """A venv without pip or site packages, torch reachable through a .pth line; its python."""
    run([sys.executable, "-m", "venv", "--without-pip", str(path)])
    py = path / "bin" / "python"
    purelib = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    torch_dir = Path(__import__("torch").__file__).parent.parent
    (Path(purelib) / "outer_torch.pth").write_text(f"{torch_dir}\n")
    return py


def pip_install(py: Path, target: Path):
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "--disable-pip-version-check", "-q",
         "--no-deps", str(target)])


def env_for(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RSA_", "PYTHON", "TORCH_EXTENSIONS"))}
    ninja = shutil.which("ninja") or str(Path(sys.executable).parent / "ninja")
    env["PATH"] = f"{os.path.dirname(ninja)}{os.pathsep}{env.get('PATH', '')}"  # the first-use build's ninja
    env["TORCH_EXTENSIONS_DIR"] = str(tmp / "torch_extensions")
    env.update(extra)
    return env


def check(py: Path, env: dict, cwd: Path) -> tuple[dict, str]:
    proc = run([str(py), "-c", CHECK], env=env, cwd=cwd)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """The sdist, and a wheel built from the unpacked sdist as pip would (no isolation)."""
    tmp = tmp_path_factory.mktemp("dists")
    run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp)], cwd=ROOT)
    (sdist,) = tmp.glob("rsa_kernels-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "src", filter="data")
    (src,) = (tmp / "src").iterdir()
    run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", "--no-build-isolation",
         "--no-deps", "-w", str(tmp / "wheel"), str(src)], env=env_for(tmp))
    (wheel,) = (tmp / "wheel").glob("rsa_kernels-*.whl")
    return sdist, wheel


def test_sdist_carries_the_sources(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for f in ("csrc/simd.h", "csrc/rows.h", "csrc/select.h", "csrc/fresh.h", "csrc/token_stats.cpp",
              "csrc/slices.cpp", "setup.py", "pyproject.toml", "rsa_kernels/extension.py"):
        assert f in names
    assert not any(n.endswith((".so", "_built.json")) for n in names)


def test_wheel_installs_into_a_fresh_venv_and_agrees_with_the_reference(dists, tmp_path):
    from rsa_kernels import extension
    _, wheel = dists
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for level in extension.built_levels():
        assert any(n.startswith(f"rsa_kernels/_C_{level}.") and n.endswith(".so") for n in names), level
    assert "rsa_kernels/_built.json" in names and "rsa_kernels/csrc/simd.h" in names
    py = fresh_venv(tmp_path / "venv")
    pip_install(py, wheel)
    for level in extension.runnable_levels():
        got, err = check(py, env_for(tmp_path, RSA_CPU_ISA=level), tmp_path)
        assert got["package"].startswith(str(tmp_path / "venv")), got  # the installed copy, not this tree
        assert got["file"].startswith(str(tmp_path / "venv")) and got["level"] == level, got  # no first-use build
        assert got["torch"] == got["runtime_torch"] and got["worst"] < 1e-9, got
        assert "compiling" not in err


@pytest.fixture(scope="module")
def pure_wheel(tmp_path_factory):
    """A wheel without the kernels (RSA_NO_EXTENSION=1): what a build without torch gives."""
    tmp = tmp_path_factory.mktemp("pure")
    run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", "--no-build-isolation",
         "--no-deps", "-w", str(tmp), str(ROOT)], env=env_for(tmp, RSA_NO_EXTENSION="1"))
    (wheel,) = tmp.glob("rsa_kernels-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert not any(n.endswith((".so", "_built.json")) for n in names) and "rsa_kernels/csrc/slices.cpp" in names
    return wheel


def test_first_use_build_once_under_a_lock_and_never_for_another_torch(pure_wheel, tmp_path):
    """The package without the kernels compiles the chosen level on first use: two processes
    started together build it once; the next run reuses it; a package build recorded for
    another torch is not loaded (one for this torch is)."""
    py = fresh_venv(tmp_path / "venv")
    pip_install(py, pure_wheel)
    env = env_for(tmp_path, RSA_CPU_ISA="portable")  # one level: the quickest build
    procs = [subprocess.Popen([str(py), "-c", CHECK], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=1800) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sum("rsa-kernels: compiling the C++ kernels (portable)" in err for _, err in outs) == 1, outs
    for got in results:
        assert got["file"].startswith(str(tmp_path / "torch_extensions")) and got["level"] == "portable"
        assert got["torch"] == got["runtime_torch"] and got["worst"] < 1e-9, got
    again, err = check(py, env, tmp_path)  # cached: no second build
    assert "compiling" not in err and again["file"] == results[0]["file"]
    # this tree's own portable module (make install built it for this torch) put in the package
    built = sorted((ROOT / "rsa_kernels").glob("_C_portable.*.so"))
    if not built:
        pytest.skip("this tree has no ahead-of-time build to plant")
    pkg = Path(again["package"]).parent
    shutil.copy(built[0], pkg / built[0].name)
    info = pkg / "_built.json"
    info.write_text(json.dumps({"torch_version": again["runtime_torch"], "levels": ["portable"]}))
    own, _ = check(py, env, tmp_path)
    assert own["file"] == str(pkg / built[0].name)  # recorded for this torch: loaded
    info.write_text(json.dumps({"torch_version": "2.0.0", "levels": ["portable"]}))
    other, _ = check(py, env, tmp_path)
    assert other["file"] == again["file"]  # recorded for another torch: never loaded


def test_no_compiler_warns_once_and_runs_the_torch_backend(pure_wheel, tmp_path):
    py = fresh_venv(tmp_path / "venv")
    pip_install(py, pure_wheel)
    code = ("import warnings, torch, rsa_kernels\n"
            "z = torch.randn(3, 50, dtype=torch.float64)\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    rsa_kernels.token_stats(z, z + 1, torch.tensor([0, 1, 2]), risk='cvar:0.5')\n"
            "    rsa_kernels.token_stats(z, z + 1, torch.tensor([0, 1, 2]), risk='cvar:0.5')\n"
            "print(len(w)); print(w[0].message)\n"
            "print(rsa_kernels.available_backends())\n")
    out = run([str(py), "-c", code], env=env_for(tmp_path, CXX="/nonexistent/c++"), cwd=tmp_path).stdout
    lines = out.strip().splitlines()
    assert lines[0] == "1" and "no C++ compiler" in lines[1] and "torch backend" in lines[1], out
    assert "'cpu'" not in lines[2]
