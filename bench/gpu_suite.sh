#!/usr/bin/env bash
# The GPU suite (issue 15): one command, under 5 minutes on one GPU, writes <out>/gpu.md with
#   1. QAT step / float step and peak memory ratios at 224x224, batch 64, torchvision ResNet-18 and
#      MobileNetV2: hq and torch.ao side by side, eager and compiled (bench/bench_qat_step.py);
#   2. fake quant forward + backward against a plain copy of the same tensor (bench/gpu_checks.py);
#   3. converted (integer) inference against float inference (bench/gpu_checks.py);
#   4. `pytest -m gpu`.
#
# Usage: bench/gpu_suite.sh [--device cuda|cpu] [--out DIR]
#   --device cpu runs every part at tiny sizes (ResNet-18 only, dynamo's eager backend): the smoke test
#   of tests/test_gpu_suite.py, which proves the script works before a GPU is at hand.
#   PYTHON=... picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
OUT=bench/results
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "Expected --device cuda|cpu or --out DIR, but got '$1'." >&2; exit 2 ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
REPORT="$OUT/gpu.md"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [ "$DEVICE" = cuda ]; then
  CONFIGS=224x224:64:0; STEPS=10; WARMUP=3; BACKEND=inductor; MODELS=resnet18,mobilenet_v2
  FQ_ARGS="--batch 64 --size 56 --repeats 20"; CONV_ARGS="--batch 64 --size 224 --repeats 10"
  PYTEST_TARGETS="tests"
else
  # smoke sizes; the first two compiled steps compile (observers initialise their buffers on the
  # first, which recompiles once on the second), so two warm-up steps
  CONFIGS=32x32:2:1; STEPS=2; WARMUP=2; BACKEND=eager; MODELS=resnet18
  FQ_ARGS="--batch 2 --size 8 --repeats 2"; CONV_ARGS="--batch 2 --size 32 --repeats 2 --models resnet18"
  PYTEST_TARGETS="tests/test_gpu.py"
fi

start=$(date +%s)
section() { echo "== $1 ($(( $(date +%s) - start )) s)" >&2; }

section "QAT step"
"$PYTHON" bench/bench_qat_step.py --device "$DEVICE" --configs "$CONFIGS" --steps "$STEPS" --warmup "$WARMUP" \
  --compile-backend "$BACKEND" --models "$MODELS" \
  --variants "float,hq fuse_bn,torch.ao,float compiled,hq fuse_bn compiled,torch.ao compiled" \
  --out "$WORK/qat_step.md" >&2

section "fake quant vs copy"
"$PYTHON" bench/gpu_checks.py fakequant --device "$DEVICE" --compile-backend "$BACKEND" $FQ_ARGS > "$WORK/fakequant.md"

section "converted vs float"
"$PYTHON" bench/gpu_checks.py converted --device "$DEVICE" $CONV_ARGS > "$WORK/converted.md"

section "pytest -m gpu"
set +e
"$PYTHON" -m pytest -q -m gpu -p no:cacheprovider $PYTEST_TARGETS > "$WORK/pytest.txt" 2>&1
PYTEST_RC=$?
set -e
elapsed=$(( $(date +%s) - start ))

{
  echo "# GPU suite"
  echo
  echo "Written by \`bench/gpu_suite.sh --device $DEVICE\` in ${elapsed} s; $("$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"))')."
  echo "Ratios are against the float model on the same device (compiled variants: against \`float compiled\`)."
  echo
  echo "## 1. QAT step and peak memory ($CONFIGS as HxW:batch:threads, torchvision models, 10 classes)"
  echo
  cat "$WORK/qat_step.md"
  echo
  echo "## 2. Fake quant forward + backward against a plain copy of the same tensor"
  echo
  cat "$WORK/fakequant.md"
  echo
  echo "## 3. Converted (integer) inference against float inference"
  echo
  cat "$WORK/converted.md"
  echo
  echo "## 4. \`pytest -m gpu\` (exit status $PYTEST_RC)"
  echo
  echo '```'
  tail -n 15 "$WORK/pytest.txt"
  echo '```'
} > "$REPORT"
section "wrote $REPORT"
exit $PYTEST_RC
