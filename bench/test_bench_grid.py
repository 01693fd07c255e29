"""The benchmark grid of `rsa bench`, as a pytest-benchmark suite: the source of its times.

Run by `rsa bench` (which collects --benchmark-json), or by hand:

    RSA_BENCH_MODE=quick .venv/bin/python -m pytest bench/test_bench_grid.py --benchmark-json out.json

RSA_BENCH_MODE (tiny|quick|full), RSA_BENCH_DEVICE (cpu|cuda) and RSA_BENCH_BACKENDS
(comma-separated) choose the grid (rsa/bench/grid.py). One test per case: each round is
one forward + backward step; pytest-benchmark times the backward, and the forward (in
pedantic's untimed setup) is timed with perf_counter into extra_info["forward_s"]; medians
over the timed rounds after the warm-up rounds. On CUDA the test also records the step's
peak allocator memory (extra_info); on a CPU `rsa bench` measures memory in a separate
process (rsa.bench.peak). Nothing is asserted about speed.
"""
import pytest

pytest.importorskip("pytest_benchmark")

from rsa.bench.grid import case_rounds, grid_from_env, mode_from_env  # noqa: E402
from rsa.bench.measure import peak_step_bytes, timed_step  # noqa: E402
from rsa.bench.workloads import Workload  # noqa: E402

CASES, WARMUP, ROUNDS = grid_from_env()
MODE = mode_from_env()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_step(benchmark, case):
    work = Workload(case)
    benchmark.group = f"{case.path}-{case.risk}-{case.objective}-N{case.n}-V{case.v}-H{case.h}"
    benchmark.extra_info.update(case.as_dict(), case_id=case.id)
    forward_s: list = []
    setup, target = timed_step(work, forward_s)
    benchmark.pedantic(target, setup=setup, rounds=case_rounds(case, MODE, ROUNDS), warmup_rounds=WARMUP,
                       iterations=1)
    benchmark.extra_info["forward_s"] = forward_s[WARMUP:]  # the timed rounds' forwards
    assert all(p.grad is not None for p in work.params)
    if case.device.startswith("cuda"):
        # the allocator's peak resets per step, so CUDA memory needs no separate process
        # (which would compile the torch.compile and Liger baselines a second time)
        benchmark.extra_info.update(peak_bytes=peak_step_bytes(work), input_bytes=work.input_bytes(),
                                    grad_bytes=work.grad_bytes())
