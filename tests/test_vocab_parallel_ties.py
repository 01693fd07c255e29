"""Issue 30 across 2 and 3 real processes (gloo, CPU): ties of D and slices without vocabulary.

One launch of 3 processes runs tests/vocab_parallel_ties_worker.py (a 2-rank group of global
ranks 1 and 2, then the 3-rank world), for the slice kernels of every backend usable here
(triton interpreted, fewer cases). The worker records every check on every rank:
  ties     tie-heavy rows: each slice kernel's statistics and gradient equal the torch
           backend's on the whole rows (float64 to 1e-12);
  padding  a rank whose slice is all padding, and a rank of width 0, every risk, float32 and
           bfloat16: no collective falls out of step (a rank that waits gives up after the
           worker's COLLECTIVE_TIMEOUT, a hung launch is killed after LAUNCH_TIMEOUT).
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

WORKER = Path(__file__).with_name("vocab_parallel_ties_worker.py")
LAUNCH_TIMEOUT = 600

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab_parallel_ties")
    # the code under test: this checkout (VP_CODE overrides: to run these tests on other code)
    code = os.environ.get("VP_CODE", str(WORKER.parent.parent))
    env = dict(os.environ, WORLD_SIZE="3", INIT_FILE=str(tmp / "rendezvous"), OUT=str(tmp), GLOO_SOCKET_IFNAME="lo",
               MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", COLLECTIVE_TIMEOUT="60",
               PYTHONPATH=os.pathsep.join([code, str(WORKER.parent), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(WORKER)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(3)]
    deadline, logs = time.monotonic() + LAUNCH_TIMEOUT, []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [p.communicate()[0][-1500:] for p in procs]
        pytest.fail(f"a rank hung: killed after {LAUNCH_TIMEOUT} s:\n" + "\n".join(
            f"--- rank {r}\n{t}" for r, t in enumerate(tails)))
    bad = [f"--- rank {r} exited with {p.returncode}:\n{log[-3000:]}" for r, (p, log) in enumerate(zip(procs, logs))
           if p.returncode]
    assert not bad, "\n".join(bad)
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(3)]
    return {2: [ranks[1]["2"], ranks[2]["2"]], 3: [r["3"] for r in ranks]}


@pytest.fixture(params=[2, 3], ids=lambda w: f"{w}ranks")
def records(request, launches):
    return launches[request.param]


def failures(records, test):
    rows = [(r, rec) for r, recs in enumerate(records) for rec in recs if rec["test"] == test]
    assert rows, f"no records of {test}"
    return [f"rank {r} {rec['kind']} {rec['case']}: {rec['error']}" for r, rec in rows if not rec["ok"]]


def test_ties_equal_the_torch_backend_on_every_layout(records):
    """cvar's split atom and ra_dpo_cvar's mask at ties: every slice kernel, every layout."""
    bad = failures(records, "ties")
    assert not bad, "\n".join(bad)


def test_padding_and_empty_ranks_stay_in_step(records):
    bad = failures(records, "padding")
    assert not bad, "\n".join(bad)


def test_every_case_ran(records):
    cases = {(rec["kind"], rec["case"]) for rec in records[0]}
    kinds = {k for k, _ in cases}
    assert {"torch"} <= kinds
    for kind in kinds - {"triton"}:
        for layout in ("tail", "empty"):
            for risk in ("kl", "erm:1", "cvar:0.9", "ra_dpo_cvar:0.5"):
                for dtype in ("torch.float32", "torch.bfloat16"):
                    assert (kind, f"{risk} {dtype} {layout}") in cases
        for tie in ("integer", "bf16", "straddle"):
            assert any(c.startswith("cvar:0.5 torch.float64 " + tie) for k, c in cases if k == kind)
