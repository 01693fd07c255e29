"""Triton kernels of the `triton` backend, one kernel per file.

Do not import these modules directly: rsa_kernels.backends.triton_rows loads this folder
once per Triton mode (compiled, or TRITON_INTERPRET=1), because @triton.jit decides at
decoration time whether a kernel is compiled or interpreted.
"""
