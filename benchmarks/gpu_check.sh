#!/usr/bin/env bash
# Every GPU check in one call, for a borrowed GPU machine that has torch but not fastai (../shared/gpu/README.md).
#
# Here, first:   bash ../shared/gpu/prepare-wheels.sh && mkdir -p data && cp -r ../shared/data/catsdogs data/
# There:         bash benchmarks/gpu_check.sh          (with .whl and data/catsdogs carried along)
#
# Writes device_check.json and train_speed.json into $OUT (or ./build/gpu-check), each one JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-build/gpu-check}"
mkdir -p "$out"
if ! python3 -c "import fastai" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 benchmarks/device_check.py --device cuda 2>"$out/device_check.err" | tail -1 | tee "$out/device_check.json"
python3 benchmarks/train_speed.py --data data/catsdogs --device cuda --size 224 --bs 64 --epochs 8 --no-preset \
  2>"$out/train_speed.err" | tail -1 | tee "$out/train_speed.json"
