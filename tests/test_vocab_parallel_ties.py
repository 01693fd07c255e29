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

import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from test_vocab_parallel import failures, finish, start

WORKER = Path(__file__).with_name("vocab_parallel_ties_worker.py")
LAUNCH_TIMEOUT = 600

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab_parallel_ties")
    # the code under test: this checkout (VP_CODE overrides: to run these tests on other code)
    procs = start(3, tmp, WORKER, os.environ.get("VP_CODE"))
    ranks = finish(procs, tmp, time.monotonic() + LAUNCH_TIMEOUT)
    return {2: [ranks[1]["2"], ranks[2]["2"]], 3: [r["3"] for r in ranks]}


@pytest.fixture(params=[2, 3], ids=lambda w: f"{w}ranks")
def records(request, launches):
    return launches[request.param]


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
