#!/usr/bin/env bash
# Every GPU check in one call, for a borrowed GPU machine that has torch but not fastai (../shared/gpu/README.md).
#
# Here, first:   bash ../shared/gpu/prepare-wheels.sh && mkdir -p data && cp -r ../shared/data/catsdogs data/
#                (and bash benchmarks/gpu_stack_check.sh: the same code on that machine's torch, on this CPU)
# There:         bash benchmarks/gpu_check.sh          (with .whl and data/catsdogs carried along)
#
# Writes train_speed.json, device_check.json, step_profile.json, model_step.json and batch_overhead.json into $OUT (or
# ./build/gpu-check), one JSON line each, every step's stderr in stderr.log. A step that fails or runs out
# of time does not stop the next one.
case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0;; esac
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-build/gpu-check}"
mkdir -p "$out"
if ! python3 -c "import fastai" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, fastai, timm; print(sys.version.split()[0], 'torch', torch.__version__, 'fastai', fastai.__version__, 'timm', timm.__version__)"
  nproc; } | tee "$out/machine.txt"
step() {  # step NAME SECONDS COMMAND...: the command's last stdout line into NAME.json, its stderr into stderr.log
  local name=$1 seconds=$2; shift 2
  local start=$SECONDS
  echo "=== $name" >> "$out/stderr.log"  # one file for all: the device tool brings back at most 8
  timeout "$seconds" "$@" 2>>"$out/stderr.log" | tail -1 | tee "$out/$name.json"
  echo "$name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$out/machine.txt"
}
# Most telling first; the limits add up to under the device tool's 600 s a call.
step train_speed 240 python3 benchmarks/train_speed.py --data data/catsdogs --device cuda --size 224 --bs 64 \
  --epochs 8 --no-preset
step device_check 180 python3 benchmarks/device_check.py --device cuda
step step_profile 80 python3 benchmarks/step_profile.py --data data/catsdogs --device cuda --size 224 --bs 64
step model_step 40 python3 benchmarks/model_step.py --device cuda --size 224 --bs 64 --steps 20
step batch_overhead 40 python3 benchmarks/batch_overhead.py --device cuda --size 224
