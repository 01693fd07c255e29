#!/usr/bin/env bash
# One check for a lent GPU (nothing is installed from the network), each step time-boxed so
# that the whole run fits one 600 s device command (the boxes add up to 540 s):
#   1. versions; 2. the triton backend's and the fused lm-head kernel's tests compiled on cuda;
#   3. bench/gpu_bench.py: forward/backward at N=16384, V=128256, bf16 vs copy bandwidth, plain and compiled;
#   4. bench/gpu_check_fused_kernel.py: the fused lm-head kernel vs the chunked path (log joins fused.log);
#   5. bench/triton_quantile_sweep.py: cvar/ra_dpo_cvar forward under several histogram launch shapes;
#   6. bench/gpu_check_fused_linear.py: fused-linear agreement on CUDA, time and memory vs plain, compiled and Liger;
#   7. `rsa bench --quick` on CUDA: the same report as on CPU, labelled with the device.
# Liger Kernel is optional: carry its wheel in .whl/ (see docs/bench.md). Writes logs under $OUT.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
LOGDIR=${OUT:-/tmp}
mkdir -p "$LOGDIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")' || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null || true

step() {  # step NAME SECONDS CMD...: run time-boxed, log to $LOGDIR/NAME.log, record the status
  local name=$1 secs=$2; shift 2
  local start=$(date +%s)
  timeout "$secs" "$@" 2>&1 | tee "$LOGDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc in $(( $(date +%s) - start )) s"
  RESULTS="$RESULTS $name=$rc"
  [ "$rc" = 0 ] || FAILED=1
}
RESULTS="" FAILED=0
step tests ${T_TESTS:-120} $PY -m pytest tests/test_triton_backend.py tests/test_fused_kernel.py -q -x -p no:cacheprovider --durations=5
# compiled for the two risks issue 16 names (each compile takes tens of seconds; the box is shared)
step bench ${T_BENCH:-100} $PY bench/gpu_bench.py --compiled-risks kl,cvar:0.9 --out "$LOGDIR"
step fused_kernel ${T_FUSED_KERNEL:-90} $PY bench/gpu_check_fused_kernel.py
step sweep ${T_SWEEP:-60} $PY bench/triton_quantile_sweep.py
step fused ${T_FUSED:-80} $PY bench/gpu_check_fused_linear.py
step rsa_bench ${T_RSA_BENCH:-90} $PY -m rsa.cli bench --quick --device cuda --out "$LOGDIR/rsa-bench"
if [ -n "${OUT:-}" ]; then  # the device tool returns at most 8 files: keep the report's four
  find "$LOGDIR/rsa-bench" -type f ! -name results.json ! -name report.md ! -name '*.png' -delete 2>/dev/null
  find "$LOGDIR/rsa-bench" -mindepth 1 -type d -empty -delete 2>/dev/null
  rm -f "$LOGDIR/rsa_bench.log"
  cat "$LOGDIR/fused_kernel.log" >> "$LOGDIR/fused.log" 2>/dev/null && rm -f "$LOGDIR/fused_kernel.log"
  cat "$LOGDIR/sweep.log" >> "$LOGDIR/bench.log" 2>/dev/null && rm -f "$LOGDIR/sweep.log"
fi
echo "== summary:$RESULTS"
exit $FAILED
