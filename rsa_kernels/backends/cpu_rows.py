"""The `cpu` backend: fused C++ row kernels (csrc/, built as rsa_kernels._C).

Same contract and saved scalars as torch_rows, so the two are interchangeable row by row.
Each token row is one task on torch's intra-op threads (torch.set_num_threads applies); a
row reads its logits from memory once and keeps them in cache for the remaining sweeps
(docs/cpu_backend.md). Masked rows are skipped: their stats and saved scalars stay 0.
``chunk_size`` is accepted for the contract and ignored: the kernels never hold more than a
few rows of V per thread.
"""
from __future__ import annotations

import os

import torch

from .. import _C  # ImportError when the kernels cannot be had here (no compiler...): the registry says why
from ..reference import accumulation_dtype
from ..risk import Risk

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _labels(labels: torch.Tensor) -> torch.Tensor:
    return labels.to(torch.int64).contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] == 1 or t.stride(-1) == 1 else t.contiguous()


THP = "/sys/kernel/mm/transparent_hugepage"
BALLOON = "/sys/bus/virtio/drivers/virtio_balloon"
_REPORTING_BIT = 5  # VIRTIO_BALLOON_F_REPORTING: freed memory goes back to the hypervisor


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _selected(value: str) -> str:
    """The bracketed choice of a THP setting ("always [madvise] never" -> "madvise")."""
    return value[value.find("[") + 1:value.find("]")] if "[" in value else value


def huge_pages_here(thp: str = THP, balloon: str = BALLOON) -> tuple[bool, str]:
    """Whether a fresh gradient on 2 MiB pages cannot stall here, and why (docs/cpu_backend.md,
    "The fresh gradient"). madvise(MADV_HUGEPAGE) gains only where THP is `madvise` (with
    `always` torch.empty gets huge pages already, without the advice's compaction; with
    `never` none), and loses where a huge page may cost more than the 4 KiB faults it
    replaces: where the kernel compacts memory in the fault for advised regions (defrag
    `always`, `madvise`, `defer+madvise`) or a virtio balloon reports freed memory to the
    hypervisor (the next huge page is then memory the host must fault in first)."""
    enabled, defrag = _selected(_read(f"{thp}/enabled")), _selected(_read(f"{thp}/defrag"))
    if enabled != "madvise":
        return False, f"transparent huge pages: enabled={enabled or 'absent'}"
    if defrag not in ("defer", "never"):
        return False, f"transparent huge pages: defrag={defrag} compacts memory in the fault"
    try:
        devices = sorted(os.listdir(balloon))
    except OSError:
        devices = []
    for dev in devices:
        bits = _read(f"{balloon}/{dev}/features")
        if dev.startswith("virtio") and len(bits) > _REPORTING_BIT and bits[_REPORTING_BIT] == "1":
            return False, "freed memory is reported to the hypervisor (virtio balloon)"
    return True, f"transparent huge pages: enabled={enabled} defrag={defrag}, no free page reporting"


def _huge_pages_setting() -> tuple[bool, str]:
    value = os.environ.get("RSA_CPU_HUGE_PAGES", "auto").strip().lower()
    if value in ("0", "1"):
        return value == "1", f"RSA_CPU_HUGE_PAGES={value}"
    if value not in ("", "auto"):
        raise ValueError(f"RSA_CPU_HUGE_PAGES: expected 0, 1 or auto, got {value!r}")
    return huge_pages_here()


# fresh gradients on 2 MiB pages (csrc/fresh.h) only where they cannot stall; RSA_CPU_HUGE_PAGES
# = 1 / 0 forces them on / off
HUGE_PAGES, HUGE_PAGES_REASON = _huge_pages_setting()


def fresh_like(z: torch.Tensor) -> torch.Tensor:
    """A new gradient of z's shape and dtype: on 2 MiB pages (csrc/fresh.h) where HUGE_PAGES
    says they cannot stall, else torch.empty (4 KiB pages)."""
    return _C.fresh_like(z.detach()) if HUGE_PAGES else torch.empty(z.shape, dtype=z.dtype)


def forward(z, zr, labels, risk: Risk, ignore_index: int, chunk_size: int | None = None):
    """Per-row (logp, ref_logp, kl, risk) as an (N, 4) tensor, and the (N, 5) saved scalars."""
    stats, saved = _C.forward(_rows(z), _rows(zr.detach()), _labels(labels), risk.code, float(risk.param),
                              int(ignore_index))
    return stats, saved


def backward(z, zr, labels, saved, grads, risk: Risk, ignore_index: int,
             inplace: bool = False, chunk_size: int | None = None):
    """d(sum of g * stats)/dz for grads = (N, 3) upstream gradients of (logp, kl, risk)."""
    acc = accumulation_dtype(z.dtype)
    z = _rows(z)
    out = z if inplace else fresh_like(z)
    with torch.no_grad():
        return _C.backward(z.detach(), _rows(zr.detach()), _labels(labels), saved.to(acc).contiguous(),
                           grads.to(acc).contiguous(), risk.code, float(risk.param), int(ignore_index),
                           out.detach() if inplace else out)


def unsupported(tensor) -> str | None:
    if tensor.device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got a tensor on {tensor.device}"
    if tensor.dtype not in _DTYPES:
        return f"the cpu backend supports float32, float64, bfloat16 and float16, got {tensor.dtype}"
    return None
