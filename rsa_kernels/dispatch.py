"""Where a call runs: the one place that looks at ``process_group``.

Each public function (token_stats, preference_loss and the two fused forms) describes its
call as ``validate(grouped)``, its own input checks, which return a Call (what the row
kernel will see, the settings every rank of a group must share, and whatever the function
wants back), and asks ``plan`` for the rows backend:

    no group   validate(False) raises ValueError on bad input; the backend is
               rsa_kernels.backends.get_backend's for the tensor;
    a group    validate(True) (labels are global ids, checked against the global vocabulary
               later) runs inside the group's agreement (vocab_parallel.agree), so that bad
               input on any rank raises ValueError on every rank; the backend is a
               VocabParallelRows over the slice kernels of the backend the name resolves to
               (cpu for CPU tensors where the extension is built, triton for CUDA tensors).

Nothing above this module branches on the group; vocab_parallel/ is a backend like the
others, below it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .backends import get_backend, get_slices
from .vocab_parallel import Local, VocabParallelRows, agree, replicated


@dataclass
class Call:
    """What a public function's own checks found in its input."""
    width: int                  # vocabulary columns of the input (a rank's slice, with a group)
    labels: torch.Tensor        # the label rows the row kernel will see
    ignore_index: int
    settings: list = field(default_factory=list)  # (name, value) pairs every rank must share
    result: Any = None          # what the function wants back (parsed risk, sequence layout, ...)


@dataclass
class Plan:
    """The rows backend for a call, and what differs with a group."""
    rows: Any                   # the row-kernel contract of rsa_kernels.backends
    group: Any                  # the process group, or None
    columns: int                # vocabulary columns a chunk row spans: the widest slice, or V
    result: Any

    def replicated(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as every rank holds it: with a group its gradient is summed over the
        ranks in the backward (the fused forms' hidden states), else unchanged."""
        return tensor if self.group is None else replicated(tensor, self.group)


def plan(process_group, backend: str, tensor: torch.Tensor, validate: Callable[[bool], Call],
         vocab_size: int | None = None) -> Plan:
    """The rows backend for ``backend`` on ``tensor`` (the logits or hidden states), after
    ``validate``. ``vocab_size``: with a group, the unpadded vocabulary (the columns from it
    on are padding and take no part)."""
    if process_group is None:
        if vocab_size is not None:
            raise ValueError("vocab_size: only with process_group (it marks the padding of a vocabulary-parallel "
                             "lm head); without one, pass the logits or weights without their padding")
        call = validate(False)
        return Plan(get_backend(backend, tensor), None, call.width, call.result)

    def check():
        call = validate(True)
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive integer or None, got {vocab_size!r}")
        try:
            kernels, resolved = get_slices(backend, tensor)
        except RuntimeError as err:  # a backend that cannot run here: every rank must hear of it
            raise ValueError(f"backend: {err}") from None
        settings = [*call.settings, ("backend", backend), ("backend (resolved)", resolved),
                    ("vocab_size", vocab_size)]
        return Local(call.width, call.labels, call.ignore_index, settings), (call.result, kernels)

    layout, (result, kernels) = agree(process_group, check, tensor.device, vocab_size)
    return Plan(VocabParallelRows(layout, kernels), process_group, layout.max_width, result)


def shared_settings(function: str, labels, risk, ignore_index, dtype, chunk_size, *more) -> list:
    """The settings every rank of a group must share, for most functions; the label *shape*
    first, so that its message comes first."""
    return [("function", function), ("labels (shape)", tuple(labels.shape)), ("labels", labels),
            ("risk", str(risk)), ("ignore_index", ignore_index), ("dtype", str(dtype)),
            ("chunk_size", chunk_size), *more]
