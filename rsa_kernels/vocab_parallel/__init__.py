"""Vocabulary-parallel statistics (SPEC section 7): each rank holds a slice of the vocabulary.

Megatron's column-parallel lm head leaves rank k with the logit columns [v_k, v_{k+1}) of
every token and no full row anywhere. rsa_kernels.dispatch, the one place that looks at
``process_group``, makes the ranks agree on their input (agreement.py: or all raise
ValueError) and hands the public functions a VocabParallelRows (rows.py): a backend object
with the row-kernel contract that exchanges per-row scalars and histograms instead of
rows, running the work on each slice with a backend's slice kernels (quantile.py: the exact
distributed quantile search for cvar and ra_dpo_cvar). replicated.py sums the hidden
states' gradient in the fused-linear forms. The communication each risk costs is in
costs.py and docs/distributed.md.
"""
from .agreement import Local, VocabLayout, agree, checksum
from .costs import forward_communication
from .replicated import replicated
from .rows import VocabParallelRows

__all__ = ["Local", "VocabLayout", "VocabParallelRows", "agree", "checksum", "forward_communication", "replicated"]
