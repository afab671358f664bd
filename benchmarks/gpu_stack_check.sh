#!/usr/bin/env bash
# gpu_check.sh's steps on this CPU, with the GPU machine's software: Python 3.12, torch 2.11, torchvision 0.26,
# huggingface_hub 1.x, no gradio, and the wheels that prepare-wheels.sh sends there (../shared/gpu/README.md).
# Code that breaks on that older torch breaks here first, before a GPU session spends its few minutes on it.
#
#   bash benchmarks/gpu_stack_check.sh       # the first time also builds build/gpu-stack/ (about 3 GB from PyPI)
#   PYTHON312=~/.pyenv/versions/3.12.1/bin/python bash benchmarks/gpu_stack_check.sh    # where python3.12 is not on PATH
#
# Prints each step's JSON line and exit status; exits non-zero if any step failed. train_speed.py is left out:
# torch 2.11's CUDA build on a machine without a GPU crashes (SIGSEGV, in torch.export's FakeTensorMode) when a
# second thread exports to ONNX, which train_speed's side-by-side runs do; with a GPU, or on torch 2.14, it does not.
case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0;; esac
set -uo pipefail
cd "$(dirname "$0")/.."
env=build/gpu-stack
if [ ! -x "$env/bin/python" ]; then
  py=${PYTHON312:-python3.12}
  "$py" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2> /dev/null ||
    { echo "error: no Python 3.12 at '$py' (the GPU machine's): set PYTHON312=/path/to/python3.12" >&2; exit 2; }
  "$py" -m venv "$env" && "$env/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 accelerate==1.15.0 \
    huggingface_hub==1.33.0 onnx==1.23.1 onnxruntime==1.30.0 onnxscript==0.7.2 safetensors==0.8.0 numpy matplotlib \
    pandas scikit-learn scipy psutil pillow tqdm requests pyyaml rich || { rm -rf "$env"; exit 2; }
fi
[ -d .whl ] || bash ../shared/gpu/prepare-wheels.sh > /dev/null || exit 2
"$env/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$env/site" \
  .whl/*.whl || exit 2
export PYTHONPATH="$PWD/$env/site:$PWD"
out=build/gpu-stack-check
mkdir -p "$out"
"$env/bin/python" -c "import sys, torch, fastai; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'fastai', fastai.__version__); import importlib.util as u; assert u.find_spec('gradio') is None, 'gradio is here'"
failed=0
step() {  # step NAME COMMAND...: the command's last line, its stderr into $out/NAME.err
  local name=$1 line status; shift
  line=$("$env/bin/python" "$@" 2> "$out/$name.err" | tail -1); status=${PIPESTATUS[0]}
  echo "$line"
  echo "$name: exit $status"
  [ "$status" -eq 0 ] && [[ "$line" != *'"passed": false'* ]] || failed=1  # device_check says so in its line
}
step device_check benchmarks/device_check.py --device cpu
step step_profile benchmarks/step_profile.py --device cpu --size 32 --bs 16 --images 48 --epochs 2
step model_step benchmarks/model_step.py --device cpu --size 32 --bs 8 --steps 2
step batch_overhead benchmarks/batch_overhead.py --device cpu --size 32
exit $failed
