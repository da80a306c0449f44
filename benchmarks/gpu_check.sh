#!/usr/bin/env bash
# One prepared GPU check for ctxsim's training and inference speed, made to fit ~8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine (torch with CUDA, torchvision, onnx, timm, typer)
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: every step on the CPU at toy sizes (checks the plumbing)
#
# Steps (each under its own timeout and a global budget, BUDGET_S=480 by default; a step that would start past
# the budget is skipped and reported as such):
#   0. install: wheels from ./wheels or ./.whl when present (pip --no-index), then ctxsim itself
#      (pip install --no-deps --no-build-isolation -e .); pytorch-metric-learning, when missing, is replaced by
#      an empty stub (only the pml baseline losses need it; nothing here builds them)
#   1. pytest -m gpu tests/core/test_gpu.py tests/core/test_knn.py  (bf16 step: fp32 loss, CPU match;
#      channels_last; compiled step; nvJPEG decode (data.decode=device) vs the CPU path; the Embedder on CUDA:
#      fp32, bf16, compiled, nvJPEG, and a "torch" index on the GPU; chunked kNN on CUDA tensors)
#   2. benchmarks/train_speed.py   Trainer.train_step vs bare loop, ResNet-50 224 px batch 128; fp16 vs bf16
#   3. benchmarks/gpu_inference.py eager bf16 vs compile_for_inference (max-autotune, CUDA graphs, freezing):
#      b256 and b1, parity
#   4. benchmarks/gpu_search.py    exact top-k over 1,000,000 x 512 (ctxsim.knn) vs the bandwidth bound
#   5. benchmarks/loss_cost.py     hybrid loss fwd+bwd at 128/256/512 as a share of a ResNet-50 step
#   6. benchmarks/decode_throughput.py  JPEG -> 224 px batch: Pillow on one core vs nvJPEG (eval and train)
# Results: every step's .md/.json in $RESULTS (default /tmp/ctxsim_gpu_results); when $OUT is set, the log,
# gpu_check.md (all tables) and gpu_check.json go there too. The short summary table is printed LAST.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=""
DEV="--device cuda"
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; DEV="--device cpu"; fi
BUDGET_S=${BUDGET_S:-480}
RESULTS=${RESULTS:-/tmp/ctxsim_gpu_results}
rm -rf "$RESULTS"; mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
export PYTHONUNBUFFERED=1
START=$(date +%s)
exec > >(tee "$LOG") 2>&1

echo "== ctxsim gpu_check $(date -u +%FT%TZ) ${DRY:-(full)}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# ---- 0. install ---------------------------------------------------------------------------------------------
for W in wheels .whl; do
  if ls "$W"/*.whl >/dev/null 2>&1; then
    echo "== installing wheels from $W/"
    $PY -m pip install -q --no-index --no-deps --no-cache-dir --find-links "$W" "$W"/*.whl || echo "!! wheel install failed"
    break
  fi
done
if ! $PY -c "import ctxsim.models, ctxsim.train" >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || $PY -m pip install -q --no-deps --no-build-isolation . >/dev/null 2>&1 \
    || echo "!! could not install ctxsim (pip install -e . --no-deps failed)"
fi
if ! $PY -c "import pytorch_metric_learning" >/dev/null 2>&1; then
  STUB=/tmp/ctxsim_stubs/pytorch_metric_learning
  mkdir -p "$STUB"
  echo '"""Stub: pytorch-metric-learning is not installed here; its baseline losses cannot be built."""' > "$STUB/__init__.py"
  : > "$STUB/losses.py"; : > "$STUB/miners.py"
  export PYTHONPATH="/tmp/ctxsim_stubs${PYTHONPATH:+:$PYTHONPATH}"
  echo "== pytorch-metric-learning missing: stubbed (pml baselines unavailable; not used here)"
fi
$PY - <<'EOF' || { echo "!! ctxsim does not import; stopping"; exit 1; }
import torch, ctxsim.train, ctxsim.models  # noqa: F401
print(f"== torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
EOF

# ---- steps ----------------------------------------------------------------------------------------------------
: > "$RESULTS/steps.txt"
step() {  # step NAME CAP_SECONDS command...
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped (budget spent)"; echo "$name skipped-budget" >> "$RESULTS/steps.txt"; return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (timeout ${cap}s, $(( $(date +%s) - START ))s elapsed)"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$cap" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "!! $name timed out after ${cap}s"
  echo "$name rc=$rc" >> "$RESULTS/steps.txt"
  echo "== $name done: rc=$rc in $(( $(date +%s) - t0 ))s"
}

# most important first: a step that would start past the budget is skipped
step tests 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/core/test_gpu.py tests/core/test_knn.py -rs
step train_speed 120 $PY benchmarks/train_speed.py $DEV $DRY --out "$RESULTS"
step inference 240 $PY benchmarks/gpu_inference.py $DEV $DRY --out "$RESULTS"
step search 60 $PY benchmarks/gpu_search.py $DEV $DRY --out "$RESULTS"
step loss_cost 60 $PY benchmarks/loss_cost.py $DEV $DRY --out "$RESULTS"
step decode 45 $PY benchmarks/decode_throughput.py $DEV $DRY --out "$RESULTS"

echo "== total $(( $(date +%s) - START ))s"
if [ -n "${OUT:-}" ]; then
  $PY benchmarks/gpu_summary.py "$RESULTS" --combine "$OUT" >/dev/null
  cp "$LOG" "$OUT/gpu_check.log" 2>/dev/null
fi
echo "== summary (details: $RESULTS/*.md${OUT:+, \$OUT/gpu_check.md})"
$PY benchmarks/gpu_summary.py "$RESULTS"
