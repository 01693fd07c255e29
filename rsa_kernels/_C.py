"""rsa_kernels._C: the C++ kernels (csrc/) at the instruction-set level chosen for this CPU.

Importing it loads that level's compiled module (rsa_kernels/extension.py: from the package
when it was built for this torch, else compiled on first use) and re-exports its functions;
LEVEL names the level. ImportError says why there is none (the cpu backend then reports it
and the torch backend runs); ValueError for a bad RSA_CPU_ISA.
"""
from .extension import load

_module = load()
globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})
MODULE = _module
