#!/usr/bin/env bash
# Set up .venv, train the pet classifier (arguments go to training/train_pets.py), then serve it.
set -euo pipefail
cd "$(dirname "$0")"
model=models/pets.pkl  # what the app serves: the model the run writes (--out)
previous=
for arg in "$@"; do  # the options are parsed with the standard library alone: nothing to install, train or serve
  case "$previous" in --out) model=$arg;; esac
  case "$arg" in
    --out=*) model=${arg#--out=};;
    -h|--help)
      echo "bash quickstart.sh [OPTIONS]: set up .venv (requirements.txt), train the pet classifier with OPTIONS,"
      echo "then serve it on http://127.0.0.1:7860 (GRADIO_SERVER_PORT=N: port N). Without options it downloads"
      echo "Oxford-IIIT Pet (800 MB) and ImageNet weights; offline: --data ../shared/data/catsdogs --preset scratch"
      echo "--time-budget 120."
      echo "OPTIONS are training/train_pets.py's:"
      echo
      PYTHONPATH=. exec python3 training/train_pets.py --help;;
  esac
  previous=$arg
done
port=${GRADIO_SERVER_PORT:-7860}  # checked now, not after the training (the library's check: standard library only)
PYTHONPATH=. python3 -c 'import argparse, sys
from imagelab import UserError, run_cli
from imagelab.app_options import check_listen, port
def check(argv):
    try:
        number = port(sys.argv[2])
    except argparse.ArgumentTypeError as e:
        raise UserError(f"GRADIO_SERVER_PORT: {e}") from None
    check_listen(sys.argv[1], number, how=f"GRADIO_SERVER_PORT={number % 65535 + 1} bash quickstart.sh ...")
run_cli(check)' "${GRADIO_SERVER_NAME:-127.0.0.1}" "$port" || exit 2
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements.txt
.venv/bin/python training/train_pets.py "$@"
exec .venv/bin/python apps/pets/app.py --model "$model"
