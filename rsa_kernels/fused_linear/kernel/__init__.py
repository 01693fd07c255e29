"""Triton kernels of the fused lm-head schedule (``schedule="kernel"``), one kernel per file.

Do not import these modules directly: rsa_kernels.fused_linear.fused_kernel loads this
folder once per Triton mode (compiled, or TRITON_INTERPRET=1), because @triton.jit decides
at decoration time whether a kernel is compiled or interpreted (as backends/triton_rows.py
does for the row kernels).
"""
