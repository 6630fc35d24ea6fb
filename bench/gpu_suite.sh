#!/usr/bin/env bash
# The GPU suite (issue 15): one command, writes <out>/gpu.md with
#   1. QAT step / float step and peak memory ratios at 224x224, batch 64, torchvision ResNet-18 and
#      MobileNetV2: hq and torch.ao side by side, eager and compiled (bench/bench_qat_step.py);
#   2. fake quant forward + backward against a plain copy of the same tensor (bench/gpu_checks.py);
#   3. converted (integer) inference against float inference (bench/gpu_checks.py);
#   4. `pytest -m gpu`.
#
# Usage: bench/gpu_suite.sh [--device cuda|cpu] [--out DIR] [--parts LIST] [--compiled-models LIST]
#                           [--compiled-variants LIST]
#   --device cpu runs every part at tiny sizes (ResNet-18 only, dynamo's eager backend): the smoke test
#   of tests/test_gpu_suite.py, which proves the script works before a GPU is at hand.
#   --parts picks parts (comma-separated; default all): fakequant, converted, pytest, eager, compiled.
#   --compiled-models picks the models of the compiled part (comma-separated; default all), e.g. to
#   finish one that ran out of time without paying again for the others.
#   --compiled-variants picks the variants of the compiled part the same way: hq, torch.ao.
#   COMPILE_BACKEND=... overrides torch.compile's backend (inductor on cuda, eager on cpu).
#   PYTHON=... picks the interpreter (default: .venv/bin/python if present, else python3).
#   SECTION_LIMIT=... caps each part, and each compile warm-up, in seconds (default 200 on cuda): a
#   GPU is lent for minutes, so one part that hangs or compiles for too long must not cost the others.
#
# Where the time goes. On one H200 (torch 2.11 image), with every compile in its timed part (the
# suite up to 914b1f2): fake quant vs copy 22 s; the compiled hq parts 71 s (ResNet-18) and
# 141 s (MobileNetV2), nearly all of it compiling the float and the QAT step; the whole suite about
# 8-10 minutes. Compiling dominates, so the suite now runs in two stages:
#   1. untimed: the six compiled training steps (float, hq, torch.ao; ResNet-18, MobileNetV2) warm
#      torch.compile's on-disk caches in parallel processes, with `pytest -m gpu` beside them; about
#      as long as the longest compile;
#   2. timed, one part at a time: fake quant vs copy, converted vs float, eager QAT steps, then the
#      compiled QAT steps, one process per model, which load their graphs from the caches.
# gpu.md's header lists the time each stage and part took in the run that wrote it.
#
# gpu.md is rewritten after each part, so a run stopped from outside still leaves every finished
# part; a part that fails or runs out of time is reported with the end of its log, and the suite
# goes on. The exit status is the first failing part's (0 when all pass).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
OUT=bench/results
PARTS_WANTED=",fakequant,converted,pytest,eager,compiled,"
COMPILED_MODELS=""
COMPILED_KINDS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --parts) PARTS_WANTED=",$2,"; shift 2 ;;
    --compiled-models) COMPILED_MODELS="${2//,/ }"; shift 2 ;;
    --compiled-variants) COMPILED_KINDS="${2//,/ }"; shift 2 ;;
    *) echo "Expected --device cuda|cpu, --out DIR, --parts LIST, --compiled-models LIST or --compiled-variants LIST, but got '$1'." >&2
       exit 2 ;;
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
  CONFIGS=224x224:64:0; STEPS=10; WARMUP=3; BACKEND=inductor; MODELS="resnet18 mobilenet_v2"
  FQ_ARGS="--batch 64 --size 56 --repeats 20"; CONV_ARGS="--batch 64 --size 224 --repeats 10"
  PYTEST_TARGETS="tests/test_gpu.py tests/test_nonfinite.py"; SECTION_LIMIT=${SECTION_LIMIT:-200}
else
  # smoke sizes
  CONFIGS=32x32:2:1; STEPS=2; WARMUP=2; BACKEND=eager; MODELS="resnet18"
  FQ_ARGS="--batch 2 --size 8 --repeats 2"; CONV_ARGS="--batch 2 --size 32 --repeats 2 --models resnet18"
  PYTEST_TARGETS="tests/test_gpu.py"; SECTION_LIMIT=${SECTION_LIMIT:-600}
fi

BACKEND=${COMPILE_BACKEND:-$BACKEND}  # e.g. COMPILE_BACKEND=inductor --device cpu: the two stages, timed on a CPU
COMPILED_MODELS=${COMPILED_MODELS:-$MODELS}
for part in ${PARTS_WANTED//,/ }; do
  case ",fakequant,converted,pytest,eager,compiled," in
    *",$part,"*) ;;
    *) echo "Expected --parts among fakequant, converted, pytest, eager, compiled, but got '$part'." >&2; exit 2 ;;
  esac
done
wanted() { [[ "$PARTS_WANTED" == *",$1,"* ]]; }
COMPILED_KINDS=${COMPILED_KINDS:-hq torch.ao}
COMPILED_VARIANTS=()  # the compiled part measures these against `float compiled`, one process per model
for kind in $COMPILED_KINDS; do
  case "$kind" in
    hq) COMPILED_VARIANTS+=("hq fuse_bn compiled") ;;
    torch.ao) COMPILED_VARIANTS+=("torch.ao compiled") ;;
    *) echo "Expected --compiled-variants among hq, torch.ao, but got '$kind'." >&2; exit 2 ;;
  esac
done
compiled_list() { local IFS=,; echo "float compiled,${COMPILED_VARIANTS[*]}"; }

start=$(date +%s)
STATUS=0
TIMES=()  # "part: N s" for each part run, in the report: where the suite's minutes go
# run_part NAME FILE CMD...: runs CMD under the part's time limit, its stdout to FILE, its stderr to
# the log (and to ours); a failure leaves the end of the log in FILE instead.
run_part() {
  local name="$1" file="$2" part_start; shift 2
  part_start=$(date +%s)
  echo "== $name ($(( part_start - start )) s)" >&2
  timeout --kill-after=10 "$SECTION_LIMIT" "$@" > "$file.out" 2> >(tee "$file.log" >&2)
  local rc=$?
  if [ $rc -eq 0 ]; then
    mv "$file.out" "$file"
  else
    local why="exit status $rc"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && why="stopped at the part's limit of ${SECTION_LIMIT} s"
    { echo "**$name: not measured ($why).** The end of its log:"; echo; echo '```'
      tail -n 20 "$file.log"; echo '```'; } > "$file"
    [ $STATUS -ne 0 ] || STATUS=$rc
  fi
  TIMES+=("$name: $(( $(date +%s) - part_start )) s")
  write_report
}

part() {  # the part's markdown, or a line saying why it has not run
  if [ -f "$WORK/$1" ]; then cat "$WORK/$1"
  elif wanted "$2"; then echo "_Not run: the suite stopped before this part._"
  else echo "_Not run in this call (--parts / --compiled-models)._"; fi
}

write_report() {
  local elapsed=$(( $(date +%s) - start ))
  {
    echo "# GPU suite"
    echo
    echo "Written by \`bench/gpu_suite.sh --device $DEVICE\` after ${elapsed} s; $DEVICE_LINE."
    if [ ${#TIMES[@]} -gt 0 ]; then
      local joined; joined=$(printf '%s; ' "${TIMES[@]}")
      echo "Time per part: ${joined%; }."
    fi
    echo "Ratios are against the float model on the same device (compiled variants: against \`float compiled\`)."
    echo
    echo "## 1. QAT step and peak memory ($CONFIGS as HxW:batch:threads, torchvision models, 10 classes)"
    echo
    echo "Eager:"
    echo
    part qat_eager.md eager
    for model in $MODELS; do
      echo
      echo "Compiled ($BACKEND), $model:"
      echo
      if [[ " $COMPILED_MODELS " == *" $model "* ]]; then part "qat_compiled_${model}.md" compiled
      else part "-" "-"; fi
    done
    echo
    echo "## 2. Fake quant forward + backward against a plain copy of the same tensor"
    echo
    part fakequant.md fakequant
    echo
    echo "## 3. Converted (integer) inference against float inference"
    echo
    part converted.md converted
    echo
    if [ -f "$WORK/pytest.txt" ]; then
      echo "## 4. \`pytest -m gpu\` (exit status $PYTEST_RC)"
      echo
      echo '```'
      tail -n 15 "$WORK/pytest.txt"
      echo '```'
    else
      echo "## 4. \`pytest -m gpu\`"
      echo
      part - pytest
    fi
  } > "$REPORT.tmp" && mv "$REPORT.tmp" "$REPORT"
}

DEVICE_LINE=$("$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"))' 2>&1 | tail -n 1)
write_report

QAT=("$PYTHON" bench/bench_qat_step.py --device "$DEVICE" --configs "$CONFIGS" --steps "$STEPS" --warmup "$WARMUP"
     --compile-backend "$BACKEND")

# Stage 1, nothing timed: every graph the timed parts compile is compiled once, each in its own
# process, all at once, into torch.compile's on-disk caches (inductor's FX graph and AOTAutograd
# caches, Triton's kernels); `pytest -m gpu` runs beside them. Compiling is host work and the graphs
# are independent, so this takes about as long as the longest one (MobileNetV2's QAT step) where
# one after another it took the sum; the timed parts then load each graph instead of compiling it
# (ResNet-18 on the CPU: 86 s of compiling the three variants one by one, 23 s for the process that
# loads and measures them). A warm-up that fails costs nothing but time: its timed part compiles.
WARM_PIDS=()
WARM_NAMES=()
warm() {  # warm NAME CMD...: in the background, under the part's limit, its output to a log
  local name="$1"; shift
  timeout --kill-after=10 "$SECTION_LIMIT" "$@" > "$WORK/warm_${#WARM_PIDS[@]}.log" 2>&1 &
  WARM_PIDS+=($!)
  WARM_NAMES+=("$name")
}
if wanted compiled; then
  for model in $COMPILED_MODELS; do
    for variant in "float compiled" "${COMPILED_VARIANTS[@]}"; do
      warm "$model, $variant" "${QAT[@]}" --warm-only --models "$model" --variants "$variant"
    done
  done
fi
if [ ${#WARM_PIDS[@]} -gt 0 ] || wanted pytest; then
  warm_start=$(date +%s)
  echo "== stage 1: ${#WARM_PIDS[@]} compile warm-ups in parallel$(wanted pytest && echo ', pytest -m gpu beside them') (0 s)" >&2
  if wanted pytest; then
    timeout --kill-after=10 "$SECTION_LIMIT" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider $PYTEST_TARGETS \
      > "$WORK/pytest.txt" 2>&1
    PYTEST_RC=$?
    tail -n 5 "$WORK/pytest.txt" >&2
    [ $STATUS -ne 0 ] || STATUS=$PYTEST_RC
    TIMES+=("pytest -m gpu (beside the warm-ups): $(( $(date +%s) - warm_start )) s")
  fi
  failed=()
  for i in "${!WARM_PIDS[@]}"; do
    if ! wait "${WARM_PIDS[$i]}"; then
      failed+=("${WARM_NAMES[$i]}")
      echo "-- warm-up of ${WARM_NAMES[$i]} failed; its timed part compiles it. The end of its log:" >&2
      tail -n 5 "$WORK/warm_$i.log" >&2
    fi
  done
  if [ ${#WARM_PIDS[@]} -gt 0 ]; then
    why=""; [ ${#failed[@]} -eq 0 ] || why=", failed: $(printf '%s; ' "${failed[@]}")"
    TIMES+=("compile warm-ups (${#WARM_PIDS[@]} in parallel${why%; }): $(( $(date +%s) - warm_start )) s")
  fi
  write_report
fi

# Stage 2, timed, one part at a time
wanted fakequant && run_part "fake quant vs copy" "$WORK/fakequant.md" \
  "$PYTHON" bench/gpu_checks.py fakequant --device "$DEVICE" --compile-backend "$BACKEND" $FQ_ARGS

wanted converted && run_part "converted vs float" "$WORK/converted.md" \
  "$PYTHON" bench/gpu_checks.py converted --device "$DEVICE" $CONV_ARGS

wanted eager && run_part "QAT step, eager" "$WORK/qat_eager.md" \
  "${QAT[@]}" --models "${MODELS// /,}" --variants "float,hq fuse_bn,torch.ao"
if wanted compiled; then
  for model in $COMPILED_MODELS; do
    run_part "QAT step, compiled, $model" "$WORK/qat_compiled_${model}.md" \
      "${QAT[@]}" --models "$model" --variants "$(compiled_list)"
  done
fi

echo "== wrote $REPORT ($(( $(date +%s) - start )) s)" >&2
exit $STATUS
