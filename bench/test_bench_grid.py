"""The benchmark grid of `rsa bench`, as a pytest-benchmark suite: the source of its times.

Run by `rsa bench` (which collects --benchmark-json), or by hand:

    RSA_BENCH_MODE=quick .venv/bin/python -m pytest bench/test_bench_grid.py --benchmark-json out.json

RSA_BENCH_MODE (tiny|quick|full), RSA_BENCH_DEVICE (cpu|cuda) and RSA_BENCH_BACKENDS
(comma-separated) choose the grid (rsa/bench/grid.py). Each case has a forward and a
backward benchmark: median over timed rounds after warm-up rounds; the backward's
forward runs in pedantic's untimed setup. On CUDA the backward test also records the
step's peak allocator memory (extra_info); on a CPU `rsa bench` measures memory in a
separate process (rsa.bench.peak). Nothing is asserted about speed.
"""
import pytest

pytest.importorskip("pytest_benchmark")

from rsa.bench.grid import grid_from_env  # noqa: E402
from rsa.bench.measure import peak_step_bytes, timed_backward, timed_forward  # noqa: E402
from rsa.bench.workloads import Workload  # noqa: E402

CASES, WARMUP, ROUNDS = grid_from_env()


def _tag(benchmark, case, phase):
    benchmark.group = f"{case.path}-{case.risk}-{case.objective}-N{case.n}-V{case.v}-H{case.h}-{phase}"
    benchmark.extra_info.update(case.as_dict(), phase=phase, case_id=case.id)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward(benchmark, case):
    work = Workload(case)
    _tag(benchmark, case, "forward")
    loss = benchmark.pedantic(timed_forward(work), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert loss.dim() == 0


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_backward(benchmark, case):
    work = Workload(case)
    _tag(benchmark, case, "backward")
    setup, target = timed_backward(work)
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert all(p.grad is not None for p in work.params)
    if case.device.startswith("cuda"):
        # the allocator's peak resets per step, so CUDA memory needs no separate process
        # (which would compile the torch.compile and Liger baselines a second time)
        benchmark.extra_info.update(peak_bytes=peak_step_bytes(work), input_bytes=work.input_bytes(),
                                    grad_bytes=work.grad_bytes())
