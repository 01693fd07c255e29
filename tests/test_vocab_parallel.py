"""Vocabulary-parallel statistics (SPEC section 7) across 2 and 3 real processes (gloo, CPU).

One launch of 3 processes runs tests/vocab_parallel_worker.py (process start-up dominates,
so few processes): first in a 2-rank group of global ranks 1 and 2 (the whole matrix of
risks, dtypes and input kinds), then in the 3-rank world (a subset), each for the slice
kernels of every backend usable here (torch; cpu: the C++ extension; triton: interpreted
on CPU tensors, float32 and fewer cases). The worker records every check on every rank,
and the tests below assert on those records. A rank that hangs is killed after
LAUNCH_TIMEOUT and fails the test; a collective gives up after the worker's
COLLECTIVE_TIMEOUT.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from rsa_kernels.backends import available_backends

WORKER = Path(__file__).with_name("vocab_parallel_worker.py")
LAUNCH_TIMEOUT = 420
# the slice kernels the worker runs: it sets TRITON_INTERPRET=1, so triton needs only the package
KINDS = ["torch"] + [k for k in ("cpu",) if k in available_backends()] + \
    (["triton"] if importlib.util.find_spec("triton") else [])

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def start(world: int, tmp: Path, worker: Path = WORKER, code: str | None = None) -> list[subprocess.Popen]:
    """Start ``world`` ranks of ``worker`` (torchrun's environment variables, a file rendezvous)
    on the package in ``code`` (default: this checkout)."""
    code = code or str(WORKER.parent.parent)
    env = dict(os.environ, WORLD_SIZE=str(world), INIT_FILE=str(tmp / "rendezvous"), OUT=str(tmp),
               GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", COLLECTIVE_TIMEOUT="60",
               PYTHONPATH=os.pathsep.join([code, str(worker.parent), os.environ.get("PYTHONPATH", "")]))
    return [subprocess.Popen([sys.executable, str(worker)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]


def finish(procs: list[subprocess.Popen], tmp: Path, deadline: float) -> list[dict]:
    """Wait for every rank (killing all of them at the deadline); each rank's records."""
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [p.communicate()[0][-1500:] for p in procs]
        pytest.fail("a rank hung: killed at the launch's deadline; the ranks' last lines:\n" + "\n".join(
            f"--- rank {r}\n{t}" for r, t in enumerate(tails)))
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} of {len(procs)} exited with {p.returncode}:\n{log[-4000:]}"
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(len(procs))]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """One launch of 3 processes: the 2-rank group (global ranks 1, 2), then all 3."""
    t0 = time.perf_counter()
    tmp = tmp_path_factory.mktemp("vocab_parallel")
    ranks = finish(start(3, tmp), tmp, time.monotonic() + LAUNCH_TIMEOUT)
    print(f"\n2 and 3 ranks: {time.perf_counter() - t0:.1f} s")
    return {2: [ranks[1]["2"], ranks[2]["2"]], 3: [r["3"] for r in ranks]}


@pytest.fixture(params=[2, 3], ids=lambda w: f"{w}ranks")
def records(request, launches):
    return launches[request.param]


def failures(records, test, kind=None):
    rows = [(r, rec) for r, recs in enumerate(records) for rec in recs
            if rec["test"] == test and (kind is None or rec["kind"] == kind)]
    assert rows, f"no records of {test} ({kind})"
    return [f"rank {r} {rec['kind']} {rec['case']}: {rec['error']}" for r, rec in rows if not rec["ok"]]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("test", ["token_stats", "preference_loss", "fused_token_stats", "fused_preference_loss"])
def test_equals_single_process(records, test, kind):
    """Statistics (the same on every rank) and each slice's gradient equal one process's result."""
    if test != "token_stats":
        _skip_short_triton(records, kind)
    bad = failures(records, test, kind)
    assert not bad, "\n".join(bad)


RISKS = ("kl", "erm:0.5", "erm:3", "cvar:0", "cvar:0.5", "cvar:0.95", "ra_dpo_cvar:0.1", "ra_dpo_cvar:0.9")


def _checked(records, kind):
    return {rec["case"] for rec in records[0] if rec["test"] == "token_stats" and rec["ok"] and rec["kind"] == kind}


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "triton"])
def test_every_risk_dtype_and_input_kind_was_checked(records, kind):
    cases = _checked(records, kind)
    full = len(records) == 2  # 3 ranks run a subset (vocab_parallel_worker.run_kind)
    for risk in RISKS:
        for dtype in ("torch.float64", "torch.float32"):
            kinds = ("random", "ties", "extreme") if full else (("ties", "extreme") if "64" in dtype else ("random",))
            for input_kind in kinds:
                assert f"{risk} {dtype} {input_kind}" in cases
    assert "ra_dpo_cvar interpolated onto the next value" in cases
    for risk in ("ra_dpo_cvar:0.1", "ra_dpo_cvar:0.5", "ra_dpo_cvar:0.9") if full else ("ra_dpo_cvar:0.5",):
        for dtype in ("torch.float64", "torch.float32"):  # wide slices: the bracketed search
            assert f"{risk} {dtype} samples" in cases


@pytest.mark.skipif("triton" not in KINDS, reason="triton is not installed")
def test_triton_checked_every_risk_and_the_selections(records):
    """Interpreted, the triton kernels run a shorter list (vocab_parallel_worker.run_triton)."""
    cases = _checked(records, "triton")
    if len(records) == 2:
        expected = [f"{r} torch.float32 random" for r in RISKS] + [
            "cvar:0.5 torch.float32 ties", "ra_dpo_cvar:0.5 torch.float32 ties", "erm:3 torch.float32 extreme",
            "cvar:0.95 torch.float32 extreme", "ra_dpo_cvar interpolated onto the next value"]
    else:
        expected = ["cvar:0.5 torch.float32 ties", "ra_dpo_cvar:0.5 torch.float32 ties"]
    assert set(expected) <= cases


def _skip_short_triton(records, kind):
    if kind == "triton" and len(records) == 3:
        pytest.skip("the 3-rank group runs triton's ties and communication only")


@pytest.mark.parametrize("kind", KINDS)
def test_padding_columns_change_nothing(records, kind):
    """vocab_size: Megatron's padding columns (any values) take no part, for every risk
    (ra_dpo_cvar's quantile positions included), and get a zero gradient."""
    _skip_short_triton(records, kind)
    bad = failures(records, "padding", kind)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("kind", KINDS)
def test_agreement_vector_on_the_inputs_device(records, kind):
    _skip_short_triton(records, kind)
    bad = failures(records, "agreement", kind)
    assert not bad, "\n".join(bad)


def test_bad_input_raises_value_error_on_every_rank(records):
    bad = failures(records, "bad_input")
    assert not bad, "\n".join(bad)
    per_rank = [{rec["case"] for rec in recs if rec["test"] == "bad_input"} for recs in records]
    assert all(cases == per_rank[0] for cases in per_rank) and len(per_rank[0]) >= 24
    assert {"fused: hidden states differ across the ranks", "label in the padding"} <= per_rank[0]


@pytest.mark.parametrize("kind", KINDS)
def test_communication_matches_the_stated_formula(records, kind):
    """Collectives and bytes counted at torch.distributed equal costs.forward_communication
    for the slice kernels in use (those that keep the quantile's candidates send a few more)."""
    bad = failures(records, "communication", kind)
    assert not bad, "\n".join(bad)
    for rec in records[0]:
        if rec["test"] == "communication" and rec["kind"] == kind and "rounds" in rec:
            print(f"{kind} {rec['case']}: {rec['rounds']} rounds, {rec['bytes_per_row']:.0f} B/row")


@pytest.mark.skipif(not importlib.util.find_spec("triton"), reason="triton is not installed")
def test_triton_slice_kernels_compile_for_hopper(monkeypatch):
    """Without a GPU the worker runs the triton slice kernels interpreted; compile (not run)
    each for sm_90 as well: the compiler is stricter than the interpreter."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rsa_kernels.backends import triton_slices
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    k = triton_slices._kernels()
    rows = {"z_ptr": "*bf16", "zr_ptr": "*bf16", "rows_ptr": "*i64"}
    strides = {"stride_z": "i32", "stride_zr": "i32", "V": "i32"}
    variants = [
        (k.partials, {**rows, "local_ptr": "*i64", "out_ptr": "*fp32", **strides, "mu": "fp32",
                      "ERM": "constexpr", "BLOCK": "constexpr"},
         [{"ERM": erm, "BLOCK": triton_slices.SLICE_BLOCK} for erm in (False, True)], True),
        (k.search, {**rows, "a_ptr": "*fp32", "ar_ptr": "*fp32", "prefix_ptr": "*i64", "hist_ptr": "*fp64",
                    "sums_ptr": "*fp64", "min_ptr": "*i64", **strides, "LEVEL": "constexpr", "LEVELS": "constexpr",
                    "WEIGHTED": "constexpr", "BLOCK": "constexpr"},
         [{"LEVEL": level, "LEVELS": 4, "WEIGHTED": w, "BLOCK": triton_slices.SEARCH_BLOCK}
          for level in range(5) for w in (False, True)], False),
        (k.tail, {**rows, "a_ptr": "*fp32", "ar_ptr": "*fp32", "thr_ptr": "*fp32", "out_ptr": "*fp64", **strides,
                  "BLOCK": "constexpr"}, [{"BLOCK": triton_slices.SLICE_BLOCK}], False),
    ]
    for fn, signature, constant_sets, fusion in variants:
        for constants in constant_sets:
            out = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                                 target=GPUTarget("cuda", 90, 32),
                                 options={"num_warps": triton_slices.NUM_WARPS, "enable_fp_fusion": fusion})
            assert "ptx" in out.asm


class _OneRank:
    """The all-reduces of a group of one: the sums are the slice's own."""

    def sum(self, values, inplace=False, wire_dtype=None):
        return values if wire_dtype is None else values.to(wire_dtype)

    max = min = sum

    def gather(self, values):
        return values[None]


def _search(kernels, z, zr, risk, target_hint):
    """The radix search of quantile.select on one slice, as the driver runs it."""
    import torch

    from rsa_kernels.backends.slice_keys import key_bits
    from rsa_kernels.reference import accumulation_dtype, interpolation_ranks
    from rsa_kernels.risk import parse_risk
    from rsa_kernels.vocab_parallel.quantile import select

    r = parse_risk(risk)
    acc = accumulation_dtype(z.dtype)
    a, ar = torch.logsumexp(z.to(acc), -1), torch.logsumexp(zr.to(acc), -1)
    rows = torch.arange(z.shape[0])
    target = r.param if r.kind == "cvar" else interpolation_ranks(z.shape[1], 1 - r.param)[0] + 1
    search = kernels.Chunk(z, zr, rows).search(a, ar, r, target_hint)
    sel = select(_OneRank(), search, kernels.pick, target, key_bits(acc), torch.zeros(len(rows), 1, dtype=acc),
                 finish=getattr(kernels.Search, "finish", None))
    sums, min_above = search.close(sel.key)
    guessed = getattr(search, "state", [None] * 4)[3]  # the cpu kernels' guesses of the top digit
    top = (sel.key >> (key_bits(acc) - 8)) & 255
    return (sel.key, sel.below, sel.at, sums.clone(), min_above.clone()), \
        None if guessed is None else int((guessed == top).sum())


@pytest.fixture(params=["portable", "avx2", "avx512"])
def cpu_level(request, monkeypatch):
    """The cpu slice kernels at each instruction-set level this CPU runs (tests/cpu_levels.py)."""
    pytest.importorskip("rsa_kernels.backends.cpu_slices", exc_type=ImportError)
    from cpu_levels import LEVELS, use_level
    if request.param not in LEVELS:
        pytest.skip(f"this CPU does not run the {request.param} level")
    return use_level(request.param, monkeypatch)


@pytest.mark.parametrize("risk", ["cvar:0.9", "cvar:0.3", "ra_dpo_cvar:0.3", "ra_dpo_cvar:0.95"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cpu_search_equals_torch_search_whatever_the_guess(risk, dtype, cpu_level):
    """The cpu slice kernels guess the first digit from a sample of each row and prepare the
    next level for it: right or wrong guesses (here forced by the hint), the selection,
    the weights below and at it and the sums above it are the torch kernels'."""
    import torch

    from rsa_kernels.backends import available_backends, torch_slices
    if "cpu" not in available_backends():
        pytest.skip("the C++ extension is not built")
    from rsa_kernels.backends import cpu_slices
    g = torch.Generator().manual_seed(3)
    n, w = 24, 3001  # more than the 256 samples per row
    z = (torch.randn(n, w, generator=g, dtype=torch.float64) * 2).to(getattr(torch, dtype))
    zr = z + torch.randn(n, w, generator=g, dtype=z.dtype)
    z[1] = zr[1]  # every D ties at 0
    zr[2, ::7] = float("-inf")
    z[3] = torch.randint(-2, 3, (w,), generator=g).to(z.dtype)  # few distinct values
    want, _ = _search(torch_slices, z, zr, risk, 0.5)
    hits = {}
    for hint in (0.5, 0.0, 0.999, 1.0):
        got, hits[hint] = _search(cpu_slices, z, zr, risk, hint)
        for name, a, b in zip(("key", "below", "at", "sums", "min_above"), got, want):
            if name == "min_above" and risk.startswith("cvar"):
                continue  # only ra_dpo_cvar's search tracks it (its HI)
            torch.testing.assert_close(a, b, rtol=1e-5 if dtype == "float32" else 1e-12, atol=1e-9,
                                       msg=lambda m: f"{name} (hint {hint}): {m}")
    assert min(hits.values()) < n, f"no wrong guess among the hints: {hits}"  # both paths ran


@pytest.mark.parametrize("risk", ["ra_dpo_cvar:0.95", "ra_dpo_cvar:0.5", "ra_dpo_cvar:0.1"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cpu_bracketed_search_equals_torch_search_where_it_hits(risk, dtype, cpu_level):
    """ra_dpo_cvar's search on the cpu kernels within the bracket their samples give (as
    rows.py derives it): where the group's counts say LO lies in it, the key, the counts
    below and at it, the sums above it and the next larger key are the torch search's;
    rows whose samples mislead (every 9th item differs from the rest) miss, and say so."""
    import torch

    from rsa_kernels.backends import available_backends, torch_slices
    from rsa_kernels.backends.slice_keys import key_bits
    from rsa_kernels.reference import interpolation_ranks
    from rsa_kernels.risk import parse_risk
    from rsa_kernels.vocab_parallel.quantile import bracket_of, select
    if "cpu" not in available_backends():
        pytest.skip("the C++ extension is not built")
    from rsa_kernels.backends import cpu_slices
    r, dt = parse_risk(risk), getattr(torch, dtype)
    g = torch.Generator().manual_seed(4)
    n, w = 12, 4700  # wide enough for the 512 samples: every 9th item
    z = torch.randn(n, w, generator=g, dtype=torch.float64).to(dt)
    zr = z + torch.randn(n, w, generator=g, dtype=dt)
    z[1] = zr[1]  # every D ties at 0
    zr[2, ::7] = float("-inf")
    z[3] = torch.randint(-2, 3, (w,), generator=g).to(dt)
    z[4:6], zr[4:6] = 0.0, 0.0
    zr[4, torch.arange(w) % 9 != 0] = -3.0  # the sample (every 9th item) sees only u = 0
    zr[5, ::9] = -3.0  # and here only u = -3
    rows, bits = torch.arange(n), key_bits(dt)
    a, ar = torch.logsumexp(z, -1), torch.logsumexp(zr, -1)
    target = interpolation_ranks(w, 1 - r.param)[0] + 1
    chunk = cpu_slices.Chunk(z, zr, rows)
    chunk.partials(torch.full((n,), -1), r)
    chunk.kept = None  # over the rows, not partials' candidates: the union's path (rows.py's first fallback)
    keys = bracket_of(chunk.bracket(), a, ar, bits)
    search = chunk.search(a, ar, r, target / w)
    got = select(_OneRank(), search, cpu_slices.pick, target, bits, torch.zeros(n, 1, dtype=dt), bracket=keys,
                 finish=cpu_slices.Search.finish)
    sums, min_above = search.close(got.key)
    ref = torch_slices.Chunk(z, zr, rows).search(a, ar, r, 0.5)
    want = select(_OneRank(), ref, torch_slices.pick, target, bits, torch.zeros(n, 1, dtype=dt))
    want_sums, want_min = ref.close(want.key)
    hit = got.hit
    assert bool(hit[:4].all()), f"the bracket missed rows whose samples are fair: {hit}"
    assert not bool(hit[4:6].all()), f"no misleading sample missed: {hit}"
    bounded = (keys[0] != 0) | (keys[1] != keys[2])
    assert bool(bounded[6:].all()), f"random rows searched without a bracket: {bounded}"  # the bracketed path ran
    for name, x, y in (("key", got.key, want.key), ("below", got.below, want.below), ("at", got.at, want.at),
                       ("min_above", min_above, want_min)):
        assert torch.equal(x[hit], y[hit]), name
    torch.testing.assert_close(sums[hit], want_sums[hit], rtol=1e-5 if dtype == "float32" else 1e-12, atol=1e-9)


@pytest.mark.parametrize("risk", ["cvar:0.9", "cvar:0.5", "ra_dpo_cvar:0.95", "ra_dpo_cvar:0.5"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cpu_collected_candidates_hit_and_equal_one_process(risk, dtype, monkeypatch, cpu_level):
    """The cpu slice kernels keep cvar's and ra_dpo_cvar's candidates in their first read (one
    rank here, so the group's numbers are its own): rows with a fair sample hit, so their
    search reads no row a second time; a misleading sample misses and the row is searched
    again; every row's statistics and saved scalars are the cpu backend's on the whole row."""
    import torch

    from rsa_kernels.backends import available_backends, get_backend
    from rsa_kernels.risk import parse_risk
    from rsa_kernels.vocab_parallel import rows as vp_rows
    from rsa_kernels.vocab_parallel.agreement import VocabLayout
    if "cpu" not in available_backends():
        pytest.skip("the C++ extension is not built")
    from rsa_kernels.backends import cpu_slices
    r, dt = parse_risk(risk), getattr(torch, dtype)
    g = torch.Generator().manual_seed(5)
    n, w = 14, 4700  # wide enough for both samples (every 9th item; every 18th, weighted)
    z = torch.randn(n, w, generator=g, dtype=torch.float64).to(dt)
    zr = z + torch.randn(n, w, generator=g, dtype=dt)
    zr[2, ::7] = float("-inf")
    z[3, ::11] = float("-inf")  # D = +inf: the value is +inf, as in one process
    z[4:6], zr[4:6] = 0.0, 0.0
    zr[4, torch.arange(w) % 9 != 0] = -3.0  # ra_dpo_cvar's sample sees only u = 0
    zr[5, ::9] = -3.0  # and here only u = -3
    z[6] *= 30.0  # large logits: wide rounding bounds
    labels = torch.randint(0, w, (n,), generator=g)
    hits = []
    plain = vp_rows.select

    def recorded(*args, **kw):
        sel = plain(*args, **kw)
        if kw.get("outside") is not None:
            hits.append(sel.hit.clone())
        return sel
    monkeypatch.setattr(vp_rows, "select", recorded)
    one = object.__new__(vp_rows.VocabParallelRows)
    one.layout, one.agreed, one.kernels, one.comm = VocabLayout(None, 0, (w,)), cpu_slices, cpu_slices, _OneRank()
    stats, saved = one.forward(z, zr, labels, r, -100)
    want_stats, want_saved = get_backend("cpu", z).forward(z, zr, labels, r, -100)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats, want_stats, equal_nan=True, **tol)
    torch.testing.assert_close(saved[:, :4], want_saved[:, :4], equal_nan=True, **tol)
    # cvar's atom weight (F(tau) - ALPHA) / ((1 - ALPHA) q at tau) divides a difference of rounded
    # masses: in float32 its digits differ with the order of the sums (also without candidates)
    loose = dict(rtol=1e-2, atol=1e-4) if dtype == "float32" else dict(rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(saved[:, 4], want_saved[:, 4], equal_nan=True, **loose)
    assert len(hits) == 1, "the candidates partials kept were not searched"
    fair = torch.tensor([0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13])
    assert bool(hits[0][fair].all()), f"fair samples missed: {hits[0]}"
    if r.kind == "ra_dpo_cvar":
        assert not bool(hits[0][4:6].all()), f"no misleading sample missed: {hits[0]}"


@pytest.mark.parametrize("risk", ["ra_dpo_cvar:0.95", "ra_dpo_cvar:0.2", "cvar:0.9"])
def test_cpu_kept_candidates_short_search_equals_one_process(risk, cpu_level):
    """Where every row's kept candidates' bracket lies under one top key digit (ra_dpo_cvar), the
    first round carries the second digit's histogram; after it (cvar: after two) the few
    candidates left are gathered whole: no other histogram round, and every statistic is
    one process's."""
    import torch

    from rsa_kernels.backends import available_backends, get_backend
    from rsa_kernels.risk import parse_risk
    from rsa_kernels.vocab_parallel import rows as vp_rows
    from rsa_kernels.vocab_parallel.agreement import VocabLayout
    if "cpu" not in available_backends():
        pytest.skip("the C++ extension is not built")
    from rsa_kernels.backends import cpu_slices

    class Counted(_OneRank):
        def __init__(self):
            self.widths = []

        def sum(self, values, inplace=False, wire_dtype=None):
            self.widths.append(values.shape[1])
            return super().sum(values, inplace, wire_dtype)

        def gather(self, values):
            self.widths.append("gather")
            return values[None]

    g = torch.Generator().manual_seed(6)
    n, w = 16, 6000
    z = torch.randn(n, w, generator=g)
    zr = z + 0.5 * torch.randn(n, w, generator=g)
    labels = torch.randint(0, w, (n,), generator=g)
    r = parse_risk(risk)
    one = object.__new__(vp_rows.VocabParallelRows)
    one.layout, one.agreed, one.kernels = VocabLayout(None, 0, (w,)), cpu_slices, cpu_slices
    one.comm = Counted()
    stats, saved = one.forward(z, zr, labels, r, -100)
    want_stats, want_saved = get_backend("cpu", z).forward(z, zr, labels, r, -100)
    torch.testing.assert_close(stats, want_stats, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(saved[:, :4], want_saved[:, :4], rtol=1e-4, atol=1e-4)
    histograms = [k for k in one.comm.widths if k != "gather" and k >= 256]
    assert "gather" in one.comm.widths, one.comm.widths
    # ra_dpo_cvar:0.95's brackets here lie under one top digit (D near -1); at 0.2 (D near 0.4)
    # some cross one (0.5), and cvar's are open above: two histogram rounds
    assert len(histograms) == (1 if risk == "ra_dpo_cvar:0.95" else 2), one.comm.widths


def test_cpu_pick_equals_radix_pick_bit_for_bit(cpu_level):
    import torch

    from rsa_kernels.backends import available_backends
    from rsa_kernels.backends.slice_keys import radix_pick
    if "cpu" not in available_backends():
        pytest.skip("the C++ extension is not built")
    from rsa_kernels.backends import cpu_slices
    g = torch.Generator().manual_seed(0)
    hist = torch.rand(300, 256, generator=g, dtype=torch.float64) ** 8
    hist[hist < 0.3] = 0
    hist[5] = 0  # an empty row
    hist[6, 200:] = 0
    below = torch.rand(300, generator=g, dtype=torch.float64) * 0.1
    prefix = torch.randint(0, 2**20, (300,), generator=g) << 24
    for target in (0.0, 0.5, 3.0, 1e9):
        for shift in (0, 8, 24, 56):
            want = radix_pick(hist, below, target, shift, prefix)
            got = cpu_slices.pick(hist, below, target, shift, prefix)
            for a, b in zip(got, want):
                assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["integer", "bf16", "straddle"])
@pytest.mark.parametrize("risk", ["cvar:0.5", "cvar:0.9", "ra_dpo_cvar:0.5", "ra_dpo_cvar:0.95"])
def test_cpu_kept_candidates_at_ties_equal_the_torch_backend(kind, risk, monkeypatch):
    """Tie-heavy rows (tests/tie_rows.py) through the cpu slice kernels' kept candidates (one
    rank): D = u + (A - Ar) is monotone in u, so the bracket of keys is exact with no
    rounding bound. Rows whose selection falls on one of its ends (a tie there) miss and
    are searched again; the others hit; either way the statistics are the torch backend's
    on the whole rows, to 1e-12 (float64)."""
    import torch

    from rsa_kernels.backends import available_backends, get_backend
    from rsa_kernels.risk import parse_risk
    from rsa_kernels.vocab_parallel import rows as vp_rows
    from rsa_kernels.vocab_parallel.agreement import VocabLayout
    from tie_rows import tie_rows
    if "cpu" not in available_backends():
        pytest.skip("the C++ extension is not built")
    from rsa_kernels.backends import cpu_slices
    hits, plain = [], vp_rows.select

    def recorded(*args, **kw):
        sel = plain(*args, **kw)
        if kw.get("outside") is not None:
            hits.append(sel.hit.clone())
        return sel
    monkeypatch.setattr(vp_rows, "select", recorded)
    z, zr, y = tie_rows(kind, 8, 5000, seed=3)
    r = parse_risk(risk)
    one = object.__new__(vp_rows.VocabParallelRows)
    one.layout, one.agreed, one.kernels, one.comm = VocabLayout(None, 0, (5000,)), cpu_slices, cpu_slices, _OneRank()
    stats, saved = one.forward(z, zr, y, r, -100)
    want_stats, want_saved = get_backend("torch", z).forward(z, zr, y, r, -100)
    torch.testing.assert_close(stats, want_stats, rtol=1e-12, atol=1e-12)
    active = y != -100  # (the torch backend keeps the saved scalars of masked rows; they are unused)
    torch.testing.assert_close(saved[active], want_saved[active], rtol=1e-12, atol=1e-12)
    assert len(hits) == 1
    if kind == "bf16":  # no tie at the bracket's ends: every row hits
        assert bool(hits[0].all()), hits[0]
