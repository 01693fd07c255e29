"""Builds the C++ kernels ahead of time, one module per instruction-set level
(rsa_kernels._C_portable, _C_avx2, _C_avx512; rsa_kernels/extension.py), when it can.

They are built against the torch of the build environment, so build without isolation
(`pip install --no-build-isolation .`, `make install`): torch is deliberately not a build
requirement. Without torch or a compiler, or after a failed build, the package installs
without them and rsa_kernels.extension compiles them on first use against the torch that
runs (csrc/ ships inside the package for that); `_built.json` records the torch version the
modules here were built for, and they are only ever loaded with that version.
"""
import glob
import importlib.util
import json
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("rsa_extension", os.path.join(HERE, "rsa_kernels", "extension.py"))
extension = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extension)  # on its own: the package's __init__ would import torch & co.


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (rsa_kernels/csrc), for the first-use build."""

    def run(self):
        super().run()
        dst = os.path.join(self.build_lib, "rsa_kernels", "csrc")
        os.makedirs(dst, exist_ok=True)
        for f in sorted(glob.glob(os.path.join(HERE, "csrc", "*.h")) + glob.glob(os.path.join(HERE, "csrc", "*.cpp"))):
            shutil.copy(f, dst)


sources = [os.path.join("csrc", s) for s in extension.SOURCES]
ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}


def _skip(why):
    print(f"rsa-kernels: not building the C++ kernels now ({why}); they are compiled on first use",
          file=sys.stderr)


if os.environ.get("RSA_NO_EXTENSION") == "1":
    _skip("RSA_NO_EXTENSION=1")
elif not shutil.which(os.environ.get("CXX", "c++")):
    _skip("no C++ compiler found")
else:
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as err:  # an isolated build: the runtime's torch is not here
        _skip(f"torch is not importable here: {err}")
    else:
        version = torch.__version__
        ext_modules = [CppExtension(
            f"rsa_kernels._C_{level}", sources,
            extra_compile_args=extension.compile_args(level, version),
            extra_link_args=extension.link_args(),
            optional=True,  # editable installs then skip copying a library that failed to build
        ) for level in extension.built_levels()]

        class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
            """A failed compile installs the package without that level (first-use build instead);
            _built.json lists the levels built and the torch they were built against."""

            def build_extensions(self):  # torch checks the compiler (ABI, version) here first
                self.built = []
                try:
                    super().build_extensions()
                except Exception as err:  # noqa: BLE001
                    print(f"rsa-kernels: C++ kernels not built ({err}); they are compiled on first use",
                          file=sys.stderr)
                text = json.dumps({"torch_version": version, "levels": self.built})
                self.built_info = os.path.join(os.path.dirname(self.get_ext_fullpath(self.extensions[0].name)),
                                               extension.BUILT_INFO)
                os.makedirs(os.path.dirname(self.built_info), exist_ok=True)
                with open(self.built_info, "w") as f:
                    f.write(text)

            def copy_extensions_to_source(self):  # --inplace, editable installs: _built.json goes along
                super().copy_extensions_to_source()
                # the one module of the builds before the levels would shadow rsa_kernels/_C.py
                for old in glob.glob(os.path.join(HERE, "rsa_kernels", "_C.*.so")):
                    os.remove(old)
                if getattr(self, "built_info", None):
                    shutil.copy(self.built_info, os.path.join(HERE, "rsa_kernels", extension.BUILT_INFO))

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                    self.built.append(ext.name.rsplit("_C_", 1)[1])
                except Exception as err:  # noqa: BLE001 - any compiler/ninja failure
                    print(f"rsa-kernels: building {ext.name} failed ({err}); it is compiled on first use instead",
                          file=sys.stderr)

        cmdclass["build_ext"] = OptionalBuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
