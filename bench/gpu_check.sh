#!/usr/bin/env bash
# One check for a lent GPU (nothing is installed from the network): versions, the triton
# backend's tests compiled on cuda tensors, then the benchmark of bench/gpu_bench.py.
# Writes tests.log and bench.md under $OUT when it is set. Budget: under 6 minutes.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
LOGDIR=${OUT:-/tmp}
mkdir -p "$LOGDIR"
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")' || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null || true
start=$(date +%s)
timeout 200 $PY -m pytest tests/test_triton_backend.py -q -x -p no:cacheprovider --durations=5 2>&1 | tee "$LOGDIR/tests.log"
rc_tests=${PIPESTATUS[0]}
echo "tests: rc=$rc_tests in $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout 150 $PY bench/gpu_bench.py --out "${OUT:-}"
rc_bench=$?
echo "bench: rc=$rc_bench in $(( $(date +%s) - start )) s"
exit $(( rc_tests != 0 || rc_bench != 0 ))
