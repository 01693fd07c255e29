"""The benchmark grid: which implementations, risks and sizes `rsa bench` measures.

A grid is a cross of sweeps through one centre point (N, V[, H]): each size varied alone,
the others held at the centre, so time and memory can be plotted against V and against N
and the exponents of cost fitted from the same points. The grid is named by a mode
("tiny" for the tests, "quick", "full") and a device kind ("cpu" or "cuda"); both travel
to the pytest-benchmark subprocess as environment variables.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

RISKS = ("kl", "erm:1", "cvar:0.9", "ra_dpo_cvar:0.95")
TINY_RISKS = ("kl", "cvar:0.9")   # the test's grid: one sorting risk, one that is not
MODES = ("tiny", "quick", "full")
ENV_MODE, ENV_DEVICE, ENV_BACKENDS = "RSA_BENCH_MODE", "RSA_BENCH_DEVICE", "RSA_BENCH_BACKENDS"
ENV_LIGER = "RSA_BENCH_LIGER"  # "1"/"0": include the Liger baseline (default: if it is installed)
ENV_COMPILED = "RSA_BENCH_COMPILED"  # "1"/"0": include the torch.compile baseline (default: on)
ENV_THREADS = "RSA_BENCH_THREADS"    # torch.set_num_threads in the measuring processes
# risks of the quick grid's size sweeps: one without a sort, one with
SWEEP_RISKS = ("kl", "cvar:0.9")
# torch.compile compiles once per shape and risk (10-30 s each), so that baseline is measured
# at one point of each grid only (the headline point where the grid has one, else the
# centre), for these (path, objective, risk); on token_stats every risk of the grid
COMPILED = (("fused_linear", "rsa2", "cvar:0.9"), ("fused_linear", "dpo", "kl"))

# Speed baselines (rsa/bench/baselines.py): "plain" = the published Ra-DPO formulation in
# plain PyTorch (log_softmax, softmax, their products over full (N, V) tensors,
# torch.quantile; autograd), on the fused path after materialising both models' logits;
# "compiled" = the same under torch.compile; "liger" = Liger Kernel's fused linear DPO loss
# (dpo objective only). rsa_kernels.reference is the tests' oracle, never a baseline here.
BASELINES = ("plain", "compiled", "liger")


@dataclass(frozen=True)
class Sweep:
    n: tuple            # tokens; the first value is the centre
    v: tuple            # vocabulary
    h: tuple = (0,)     # hidden size (fused-linear path only)

    def points(self) -> list[tuple[int, int, int]]:
        c = (self.n[0], self.v[0], self.h[0])
        pts = [c] + [(n, c[1], c[2]) for n in self.n[1:]] + [(c[0], v, c[2]) for v in self.v[1:]]
        pts += [(c[0], c[1], h) for h in self.h[1:]]
        return sorted(set(pts))


# (device kind, mode) -> (token_stats sweep, fused-linear sweep, warm-up rounds, timed rounds)
SIZES = {
    ("cpu", "tiny"): (Sweep((16, 32), (256, 512)), Sweep((16, 32), (256,), (32,)), 1, 2),
    ("cpu", "quick"): (Sweep((64, 16, 256), (4096, 1024, 16384)),
                       Sweep((64, 16, 128), (4096, 1024, 16384), (256, 512)), 1, 3),
    ("cpu", "full"): (Sweep((512, 128, 2048), (16384, 4096, 65536)),
                      Sweep((512, 128, 2048), (16384, 4096, 65536), (512, 2048)), 1, 5),
    ("cuda", "tiny"): (Sweep((64, 256), (1024, 4096)), Sweep((64, 256), (1024,), (128,)), 1, 3),
    ("cuda", "quick"): (Sweep((2048, 512, 8192), (32768, 8192, 131072)),
                        Sweep((2048, 512, 8192), (32768, 8192, 131072), (2048, 4096)), 2, 5),
    ("cuda", "full"): (Sweep((4096, 1024, 16384, 32768), (65536, 16384, 131072, 262144)),
                       Sweep((4096, 1024, 16384), (65536, 16384, 131072, 262144), (2048, 4096, 8192)), 3, 20),
}


@dataclass(frozen=True)
class Case:
    path: str           # "token_stats" (logits given) or "fused_linear" (hidden states + lm head)
    impl: str           # a backend name or a baseline
    risk: str
    objective: str      # "" for token_stats; "rsa2" or "dpo" for fused_linear
    n: int
    v: int
    h: int
    dtype: str
    device: str

    @property
    def id(self) -> str:
        obj = f"-{self.objective}" if self.objective else ""
        h = f"-H{self.h}" if self.h else ""
        return f"{self.path}-{self.impl}-{self.risk}{obj}-N{self.n}-V{self.v}{h}"

    @property
    def group(self) -> tuple:
        """The curve a case belongs to: everything but the sizes."""
        return (self.path, self.impl, self.risk, self.objective)

    def as_dict(self) -> dict:
        return asdict(self)


# token_stats' headline point (N, V), measured for every risk with every implementation and
# both baselines: the size the README quotes (a 1024-token batch at a 32k vocabulary)
HEADLINE = {("cpu", "quick"): (1024, 32000), ("cpu", "full"): (1024, 32000)}
# Timed rounds at the quick grid's headline point (warm-up rounds as everywhere): the
# baselines' steps take 0.25-3 s there and their rounds differ by a few percent, so 2 rounds;
# the kernels' take 0.1-0.25 s and vary more (the fresh gradient's page faults), so 5 rounds
# for a steadier median at almost no cost
QUICK_HEADLINE_ROUNDS = {"baseline": 2, "kernel": 5}


def case_rounds(case: Case, mode: str, rounds: int) -> int:
    """Timed rounds of ``case`` in a grid of ``mode`` whose default is ``rounds``."""
    at = case.path == "token_stats" and (case.n, case.v) == HEADLINE.get((device_kind(case.device), mode))
    if mode != "quick" or not at:
        return rounds
    return QUICK_HEADLINE_ROUNDS["baseline" if case.impl in BASELINES else "kernel"]


def device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def default_dtype(device: str) -> str:
    # what training uses: bf16 logits on GPUs; float32 on CPUs (bf16 matmuls are slow there)
    return "bfloat16" if device_kind(device) == "cuda" else "float32"


def make_grid(mode: str, device: str, backends: list[str], *, liger: bool, compiled: bool | None = None,
              dtype: str | None = None) -> tuple[list[Case], int, int]:
    """(cases, warm-up rounds, timed rounds) of one benchmark run."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rows, fused, warmup, rounds = SIZES[(device_kind(device), mode)]
    dtype = dtype or default_dtype(device)
    compiled = True if compiled is None else compiled
    risks = TINY_RISKS if mode == "tiny" else RISKS
    impls = [*backends, "plain"]
    headline = HEADLINE.get((device_kind(device), mode))
    # the tiny grid (the tests' smoke run) compiles once: token_stats kl at its centre
    token_compiled = ("kl",) if mode == "tiny" else risks
    cases = []

    def add(path, risk, objective, n, v, h, names):
        if path == "token_stats":
            at = (n, v) == (headline or (rows.n[0], rows.v[0]))
            wanted = risk in token_compiled
        else:
            at, wanted = (n, v, h) == fcentre, mode != "tiny" and (path, objective, risk) in COMPILED
        if compiled and at and wanted:
            names = [*names, "compiled"]
        cases.extend(Case(path, i, risk, objective, n, v, h, dtype, device) for i in names)

    # the quick grid measures every risk at the centre, and sweeps the sizes with fewer: kl
    # and cvar:0.9 (no sort, a sort) on token_stats, cvar:0.9 on the fused path, whose
    # dependence on the risk is the row kernel's
    for n, v, _ in rows.points():
        centre = (n, v) == (rows.n[0], rows.v[0])
        for risk in risks if mode != "quick" or centre else SWEEP_RISKS:
            add("token_stats", risk, "", n, v, 0, impls)
    if headline and headline not in {(n, v) for n, v, _ in rows.points()}:
        # the quick grid leaves the torch backend out here: 8-16 s a call for the sorting
        # risks would make up most of its time, and it is the fallback, not the claim
        at_headline = [i for i in impls if mode != "quick" or i != "torch"]
        for risk in risks:
            add("token_stats", risk, "", *headline, 0, at_headline)
    fcentre = (fused.n[0], fused.v[0], fused.h[0])
    for n, v, h in fused.points():
        for risk in risks if mode != "quick" or (n, v, h) == fcentre else ("cvar:0.9",):
            add("fused_linear", risk, "rsa2", n, v, h, impls)
        add("fused_linear", "kl", "dpo", n, v, h, impls + (["liger"] if liger else []))
    return cases, warmup, rounds


def mode_from_env() -> str:
    return os.environ.get(ENV_MODE, "tiny")


def grid_from_env() -> tuple[list[Case], int, int]:
    """The grid the `rsa bench` process asked for (defaults: tiny on this machine's device).

    Also applies its thread count (ENV_THREADS) to this process."""
    import torch

    import rsa_kernels

    if os.environ.get(ENV_THREADS):
        torch.set_num_threads(int(os.environ[ENV_THREADS]))
    device = os.environ.get(ENV_DEVICE) or ("cuda" if torch.cuda.is_available() else "cpu")
    mode = mode_from_env()
    names = os.environ.get(ENV_BACKENDS)
    backends = names.split(",") if names else backends_for(device, rsa_kernels.available_backends())
    liger, comp = os.environ.get(ENV_LIGER), os.environ.get(ENV_COMPILED)
    return make_grid(mode, device, backends, liger=liger_available() if liger is None else liger == "1",
                     compiled=None if comp is None else comp == "1")


def backends_for(device: str, available: list[str]) -> list[str]:
    """The backends that run tensors on ``device``: triton only on CUDA, the C++ one only on CPU."""
    if device_kind(device) == "cuda":
        return [b for b in available if b in ("torch", "triton")]
    return [b for b in available if b in ("torch", "cpu")]


def liger_available() -> bool:
    """Whether liger-kernel is installed; a failing import then shows as that case's error."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def centres(mode: str, device: str) -> dict:
    """{path: [N, V, H]} where the sweeps of ``mode`` cross (the sizes held fixed in the plots)."""
    rows, fused, _, _ = SIZES[(device_kind(device), mode)]
    return {"token_stats": [rows.n[0], rows.v[0], 0], "fused_linear": [fused.n[0], fused.v[0], fused.h[0]]}


def headline(mode: str, device: str):
    """token_stats' headline (N, V) of ``mode``, or None (then the tables use the centre)."""
    return HEADLINE.get((device_kind(device), mode))
