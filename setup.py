"""Builds the optional C++ extension rsa_kernels._C from csrc/ when it can.

The package works without it (the torch backend); so a missing compiler or a failed build
is reported and skipped rather than failing the install.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
ext_modules, cmdclass = [], {}

if sources and shutil.which(os.environ.get("CXX", "c++")) and os.environ.get("RSA_NO_EXTENSION") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as err:  # torch is needed to build; without it install the pure package
        print(f"rsa-kernels: not building the C++ extension ({err})", file=sys.stderr)
    else:
        ext_modules = [CppExtension(
            "rsa_kernels._C", sources,
            # x86-64-v3 = AVX2 + FMA (rsa_kernels/backends/cpu_rows.py refuses to load the
            # extension on a CPU without them); -ffp-contract=off keeps the interpolation and
            # comparisons bit-identical between forward and backward.
            extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-march=x86-64-v3" if os.uname().machine == "x86_64" else "-mcpu=native", "-ffp-contract=off", "-Wno-psabi"],
            extra_link_args=["-fopenmp"],
            optional=True,  # editable installs then skip copying a library that failed to build
        )]

        class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
            """A failed compile installs the package without the extension (torch backend)."""

            def build_extensions(self):  # torch checks the compiler (ABI, version) here first
                try:
                    super().build_extensions()
                except Exception as err:  # noqa: BLE001
                    print(f"rsa-kernels: C++ extension not built ({err}); installing without the cpu backend",
                          file=sys.stderr)

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as err:  # noqa: BLE001 - any compiler/ninja failure
                    print(f"rsa-kernels: building {ext.name} failed ({err}); installing without the cpu backend",
                          file=sys.stderr)

        cmdclass = {"build_ext": OptionalBuildExtension}
elif not sources:
    pass
else:
    print("rsa-kernels: no C++ compiler found; installing without the cpu backend", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
