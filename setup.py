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
            extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-march=x86-64-v3" if os.uname().machine == "x86_64" else "-mcpu=native", "-ffp-contract=off"],
            extra_link_args=["-fopenmp"],
        )]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
elif not sources:
    pass
else:
    print("rsa-kernels: no C++ compiler found; installing without the cpu backend", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
