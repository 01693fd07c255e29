"""Vocabulary-parallel statistics (SPEC section 7): each rank holds a slice of the vocabulary.

Megatron's column-parallel lm head leaves rank k with the logit columns [v_k, v_{k+1}) of
every token and no full row anywhere. The public functions take ``process_group``; then
agreement.py checks that the ranks agree (or all raise ValueError), rows.py is a backend
object with the row-kernel contract that exchanges per-row scalars and histograms instead
of rows (quantile.py: the exact distributed quantile search for cvar and ra_dpo_cvar),
and replicated.py sums the hidden states' gradient in the fused-linear forms. The
communication each risk costs is in costs.py and docs/distributed.md.
"""
from .agreement import VocabLayout, agree
from .costs import forward_communication
from .rows import VocabParallelRows

__all__ = ["VocabLayout", "VocabParallelRows", "agree", "forward_communication"]
