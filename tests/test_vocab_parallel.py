"""Vocabulary-parallel statistics (SPEC section 7) across 2 and 3 real processes (gloo, CPU).

One launch of 3 processes runs tests/vocab_parallel_worker.py (process start-up dominates,
so few processes): first in a 2-rank group of global ranks 1 and 2 (the whole matrix of
risks, dtypes and input kinds), then in the 3-rank world (a subset). The worker records
every check on every rank, and the tests below assert on those records. A rank that hangs
is killed after LAUNCH_TIMEOUT and fails the test; a collective gives up after the
worker's COLLECTIVE_TIMEOUT.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("vocab_parallel_worker.py")
LAUNCH_TIMEOUT = 240

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def start(world: int, tmp: Path) -> list[subprocess.Popen]:
    """Start ``world`` ranks (torchrun's environment variables, a file rendezvous)."""
    env = dict(os.environ, WORLD_SIZE=str(world), INIT_FILE=str(tmp / "rendezvous"), OUT=str(tmp),
               GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", COLLECTIVE_TIMEOUT="60",
               PYTHONPATH=os.pathsep.join([str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")]))
    return [subprocess.Popen([sys.executable, str(WORKER)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
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
        pytest.fail(f"a rank hung: killed after {LAUNCH_TIMEOUT} s")
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


def failures(records, test):
    rows = [(r, rec) for r, recs in enumerate(records) for rec in recs if rec["test"] == test]
    assert rows, f"no records of {test}"
    return [f"rank {r} {rec['case']}: {rec['error']}" for r, rec in rows if not rec["ok"]]


@pytest.mark.parametrize("test", ["token_stats", "preference_loss", "fused_token_stats", "fused_preference_loss"])
def test_equals_single_process(records, test):
    """Statistics (the same on every rank) and each slice's gradient equal one process's result."""
    bad = failures(records, test)
    assert not bad, "\n".join(bad)


def test_every_risk_dtype_and_input_kind_was_checked(records):
    cases = {rec["case"] for rec in records[0] if rec["test"] == "token_stats" and rec["ok"]}
    full = len(records) == 2  # 3 ranks run a subset (vocab_parallel_worker.main)
    for risk in ("kl", "erm:0.5", "erm:3", "cvar:0", "cvar:0.5", "cvar:0.95", "ra_dpo_cvar:0.1", "ra_dpo_cvar:0.9"):
        for dtype in ("torch.float64", "torch.float32"):
            kinds = ("random", "ties", "extreme") if full else (("ties", "extreme") if "64" in dtype else ("random",))
            for kind in kinds:
                assert f"{risk} {dtype} {kind}" in cases


def test_bad_input_raises_value_error_on_every_rank(records):
    bad = failures(records, "bad_input")
    assert not bad, "\n".join(bad)
    per_rank = [{rec["case"] for rec in recs if rec["test"] == "bad_input"} for recs in records]
    assert all(cases == per_rank[0] for cases in per_rank) and len(per_rank[0]) >= 15


def test_communication_matches_the_stated_formula(records):
    """Collectives and bytes counted at torch.distributed equal costs.forward_communication."""
    bad = failures(records, "communication")
    assert not bad, "\n".join(bad)
    for rec in records[0]:
        if rec["test"] == "communication" and "rounds" in rec:
            print(f"{rec['case']}: {rec['rounds']} rounds, {rec['bytes_per_row']:.0f} B/row")
