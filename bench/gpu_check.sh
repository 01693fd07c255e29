#!/usr/bin/env bash
# One check for a lent GPU (nothing is installed from the network), each step time-boxed, and the
# whole run held to T_TOTAL seconds (default 540, so it fits one 600 s device command): a step gets
# at most what is left, and is skipped with under 15 s left, so the last steps are the first to go.
#   1. versions; 2. the triton backend's and the fused lm-head kernel's tests compiled on cuda;
#   3. train_step: one training step (rsa/bench/step_run.py) at V=128256 in bf16 autocast: TRL's
#      DPOTrainer, TRL + Liger's fused-linear DPO loss, DPOTrainer(use_liger_kernel=True), RSADPOTrainer
#      dpo and rsa2, `rsa train`, the plain formulation (log joins train.log);
#   4. bench/gpu_bench.py: forward/backward at N=16384, V=128256, bf16 vs copy bandwidth, plain and compiled;
#   5. bench/gpu_check_vocab_parallel.py: the triton slice kernels under a process group, two processes on
#      the one GPU over gloo, against one process (log joins train.log);
#   6. bench/gpu_check_lora4bit.py: a tiny `rsa train` with 4-bit LoRA stages on cuda (log joins train.log);
#   7. bench/gpu_check_fused_kernel.py: the fused lm-head kernel vs the chunked path (log joins fused.log);
#   8. bench/triton_quantile_sweep.py: cvar/ra_dpo_cvar forward under several histogram launch shapes;
#   9. bench/gpu_check_fused_linear.py: fused-linear agreement on CUDA, time and memory vs plain, compiled and Liger;
#  10. `rsa bench --quick` on CUDA: the same report as on CPU, labelled with the device.
# GPU_CHECK_ONLY="train_step lora4bit" runs only the steps named. Packages the GPU image lacks (trl,
# liger-kernel, bitsandbytes, datasets: steps 3 and 6 need them) travel as wheels in .whl/ (see
# docs/bench.md). Writes logs under $OUT.
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

T_TOTAL=${T_TOTAL:-540}
BEGIN=$(date +%s)
step() {  # step NAME SECONDS CMD...: run time-boxed, log to $LOGDIR/NAME.log, record the status
  local name=$1 secs=$2; shift 2
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then return; fi
  local left=$(( T_TOTAL - ($(date +%s) - BEGIN) ))
  if [ "$left" -lt 15 ]; then echo "== $name: skipped ($left s left of T_TOTAL=$T_TOTAL)"; RESULTS="$RESULTS $name=skipped"; return; fi
  [ "$secs" -gt "$left" ] && secs=$left
  local start=$(date +%s)
  timeout "$secs" "$@" 2>&1 | tee "$LOGDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc in $(( $(date +%s) - start )) s"
  RESULTS="$RESULTS $name=$rc"
  [ "$rc" = 0 ] || FAILED=1
}
RESULTS="" FAILED=0
step tests ${T_TESTS:-120} $PY -m pytest tests/test_triton_backend.py tests/test_fused_kernel.py -q -x -p no:cacheprovider --durations=5
# one round at V=128256 (each contender a new interpreter: CUDA cannot be forked), bf16 autocast
step train_step ${T_TRAIN_STEP:-120} $PY -m rsa.bench.step_run "$LOGDIR/step.json" --mode full --device cuda --bf16 \
  --vocabs 128256 --rounds 1 --steps 5
# compiled for the two risks issue 16 names (each compile takes tens of seconds; the box is shared)
step bench ${T_BENCH:-100} $PY bench/gpu_bench.py --compiled-risks kl,cvar:0.9 --out "$LOGDIR"
step vocab_parallel ${T_VOCAB_PARALLEL:-60} $PY bench/gpu_check_vocab_parallel.py
step lora4bit ${T_LORA4BIT:-60} $PY bench/gpu_check_lora4bit.py
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
  cat "$LOGDIR/bench.md" >> "$LOGDIR/bench.log" 2>/dev/null && rm -f "$LOGDIR/bench.md"
  for f in train_step vocab_parallel lora4bit; do  # one file for the three: 8 files come back at most
    cat "$LOGDIR/$f.log" >> "$LOGDIR/train.log" 2>/dev/null && rm -f "$LOGDIR/$f.log"
  done
  rm -rf "$LOGDIR/step.json" "$LOGDIR/step-work"  # (its tables are in train.log)
fi
echo "== summary:$RESULTS"
exit $FAILED
