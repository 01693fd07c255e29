"""The group agrees on the input before any other collective, or every rank raises.

A rank whose input is wrong must not simply raise: the others would wait forever in their
next collective. So each rank checks its own input, packs the outcome (its vocabulary
width, a fingerprint of every argument that must match, or its error message) into one
small int64 vector, and one all-gather gives every rank the same table. Every rank then
runs the same checks on that table, and either all go on or all raise ValueError.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .comm import all_gather_rows, meta_device

MAX_SETTINGS = 24        # named arguments that must agree across ranks
MESSAGE_BYTES = 256      # an error message travels in this many bytes
_HEAD = 4                # status, width, largest label, number of settings


@dataclass
class Local:
    """What one rank found in its own (locally valid) input."""
    width: int                       # its vocabulary columns (rows of its lm-head slice)
    labels: torch.Tensor             # the label rows the kernel will see, global ids
    ignore_index: int
    settings: list                   # (name, value) pairs every rank must share; tensors allowed


@dataclass(frozen=True)
class VocabLayout:
    """Rank k holds the global vocabulary columns [offsets[k], offsets[k+1])."""
    group: Any
    rank: int
    widths: tuple

    @property
    def offsets(self) -> tuple:
        out = [0]
        for w in self.widths:
            out.append(out[-1] + w)
        return tuple(out)

    @property
    def start(self) -> int:
        return self.offsets[self.rank]

    @property
    def width(self) -> int:
        return self.widths[self.rank]

    @property
    def vocab(self) -> int:
        return sum(self.widths)

    @property
    def max_width(self) -> int:
        return max(self.widths)


def fingerprint(value) -> int:
    """A 63-bit digest of ``value`` that is the same in every process (hash() is salted)."""
    h = hashlib.blake2b(digest_size=8)
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    else:
        h.update(repr(value).encode())
    return int.from_bytes(h.digest(), "little") >> 1


def _encode(message: str) -> list[int]:
    raw = message.encode("utf-8")[:MESSAGE_BYTES].ljust(MESSAGE_BYTES, b"\0")
    return [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, MESSAGE_BYTES, 8)]


def _decode(words) -> str:
    raw = b"".join(int(w).to_bytes(8, "little", signed=True) for w in words)
    return raw.rstrip(b"\0").decode("utf-8", errors="replace")


def _row(local: Local | None, error: BaseException | None) -> list[int]:
    """[status, width, largest label, number of settings, settings..., message...]."""
    if local is not None:
        if len(local.settings) > MAX_SETTINGS:
            raise AssertionError("too many settings for the agreement vector")
        labels = local.labels
        valid = labels != local.ignore_index
        top = int(labels[valid].max()) if bool(valid.any()) else -1
        settings = [fingerprint(v) for _, v in local.settings]
        head = [0, local.width, top, len(settings)]
        return head + settings + [0] * (MAX_SETTINGS - len(settings)) + _encode("")
    message = f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)
    return [1, 0, -1, 0] + [0] * MAX_SETTINGS + _encode(message)


def agree(group, check: Callable[[], tuple[Local, Any]]) -> tuple[VocabLayout, Any]:
    """Run this rank's ``check`` (local validation), agree with the group, return the layout.

    ``check`` returns (Local, anything the caller wants back) or raises. Exactly one
    collective (an all-gather of MAX_SETTINGS + 36 int64 per rank) runs, whatever happens.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group: torch.distributed is not initialised (call init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD), "
                         f"got {type(group).__name__}")
    local = result = error = None
    try:
        local, result = check()
    except Exception as err:  # noqa: BLE001 - any local failure must reach the other ranks
        error = err
    row = torch.tensor(_row(local, error), dtype=torch.int64, device=meta_device(group))
    table = all_gather_rows(row, group).cpu().tolist()
    rank = dist.get_rank(group)
    failed = [k for k, r in enumerate(table) if r[0]]
    if failed:
        if error is not None:
            raise error
        k = failed[0]
        raise ValueError(f"process_group: rank {k} rejected its input: {_decode(table[k][_HEAD + MAX_SETTINGS:])}")
    _check_table(table, local)
    return VocabLayout(group, rank, tuple(r[1] for r in table)), result


def _check_table(table: list[list[int]], local: Local) -> None:
    """The same checks, in the same order, on every rank: the same ValueError everywhere."""
    names = [name for name, _ in local.settings]
    if len({r[3] for r in table}) > 1:
        raise ValueError("process_group: the ranks called different functions (their argument lists differ)")
    for i, name in enumerate(names):
        column = [r[_HEAD + i] for r in table]
        if len(set(column)) > 1:
            odd = [k for k, c in enumerate(column) if c != column[0]]
            raise ValueError(f"{name} differs across the ranks of process_group (rank 0 and rank {odd[0]}): "
                             f"every rank passes the same {name}; only the vocabulary slice differs")
    widths = [r[1] for r in table]
    vocab = sum(widths)
    top = table[0][2]
    if top >= vocab:
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={local.ignore_index}: label {top} "
                         f"is outside the global vocabulary, the concatenation of the ranks' slices {widths}")
