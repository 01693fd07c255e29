"""The group agrees on the input before any other collective, or every rank raises.

A rank whose input is wrong must not simply raise: the others would wait forever in their
next collective. So each rank checks its own input, packs the outcome (its vocabulary
width, a fingerprint of every argument that must match, or its error message) into one
small int64 vector, and one all-gather gives every rank the same table. Every rank then
runs the same checks on that table, and either all go on or all raise ValueError.

Tensors are fingerprinted by exact integer checksums computed where they lie (no copy to
the host), so that the hidden states every rank of the fused forms must hold alike are
compared too: an ungathered sequence-parallel slice, or hidden states that differ by a
rounding, stop the call on every rank.
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
    """Rank k holds the global vocabulary columns [offsets[k], offsets[k+1]); the columns
    from ``vocab_size`` on (if given) are padding, outside the vocabulary."""
    group: Any
    rank: int
    widths: tuple
    vocab_size: int | None = None

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
        """The vocabulary the statistics run over (without the padding)."""
        return sum(self.widths) if self.vocab_size is None else self.vocab_size

    @property
    def real_width(self) -> int:
        """This rank's columns inside the vocabulary: the first real_width of its slice."""
        return max(0, min(self.width, self.vocab - self.start))

    @property
    def max_width(self) -> int:
        return max(self.widths)


CHECKSUM_WORDS = 1 << 22   # 16-bit words per step of a checksum (bounds its temporaries)
_MODULUS = 65521           # the position weights cycle with this prime


def checksum(t: torch.Tensor) -> tuple:
    """(dtype, shape, sum of the 16-bit words of t, sum of each word times its position
    mod 65521 + 1): exact integers, so equal on every rank for equal tensors whatever the
    device or thread count, and computed on t's device. Any changed word changes the first
    sum; words moved to other positions change the second."""
    t = t.detach().contiguous().reshape(-1)
    words = t.view(torch.int16) if t.numel() * t.element_size() % 2 == 0 else t.view(torch.uint8)
    plain = weighted = 0
    for start in range(0, words.numel(), CHECKSUM_WORDS):
        w = words[start:start + CHECKSUM_WORDS].to(torch.int64)
        pos = torch.arange(start, start + w.numel(), device=w.device) % _MODULUS + 1
        plain += int(w.sum())
        weighted += int((w * pos).sum())
    return str(t.dtype), tuple(t.shape), plain, weighted


def _canonical(value):
    """``value`` with every tensor in it (also inside tuples and lists) by its checksum."""
    if isinstance(value, torch.Tensor):
        return checksum(value)
    if isinstance(value, (tuple, list)):
        return tuple(_canonical(v) for v in value)
    return value


def fingerprint(value) -> int:
    """A 63-bit digest of ``value`` that is the same in every process (hash() is salted)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(_canonical(value)).encode())
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


def agree(group, check: Callable[[], tuple[Local, Any]], device: torch.device,
          vocab_size: int | None = None) -> tuple[VocabLayout, Any]:
    """Run this rank's ``check`` (local validation), agree with the group, return the layout.

    ``check`` returns (Local, anything the caller wants back) or raises; ``device`` is the
    inputs' (comm.meta_device); ``vocab_size`` the unpadded vocabulary, if the slices are
    padded (check has put it among the settings). Exactly one collective (an all-gather of
    MAX_SETTINGS + 36 int64 per rank) runs, whatever happens.
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
    row = torch.tensor(_row(local, error), dtype=torch.int64, device=meta_device(group, device))
    table = all_gather_rows(row, group).cpu().tolist()
    rank = dist.get_rank(group)
    failed = [k for k, r in enumerate(table) if r[0]]
    if failed:
        if error is not None:
            raise error
        k = failed[0]
        raise ValueError(f"process_group: rank {k} rejected its input: {_decode(table[k][_HEAD + MAX_SETTINGS:])}")
    _check_table(table, local, vocab_size)
    return VocabLayout(group, rank, tuple(r[1] for r in table), vocab_size), result


def _check_table(table: list[list[int]], local: Local, vocab_size: int | None) -> None:
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
    if vocab < 1:  # a rank's slice may be empty (width 0), not the whole vocabulary
        raise ValueError(f"logits: the ranks' vocabulary slices {widths} hold no column at all")
    if vocab_size is not None:
        if vocab_size > vocab:
            raise ValueError(f"vocab_size={vocab_size} exceeds the {vocab} columns of the ranks' slices {widths}")
        vocab = vocab_size
    top = table[0][2]
    if top >= vocab:
        where = "the concatenation of the ranks' slices" if vocab_size is None else "before the padding"
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={local.ignore_index}: label {top} "
                         f"is outside the global vocabulary, {where} {widths}")
