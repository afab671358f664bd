#!/usr/bin/env bash
# Set up .venv, train the pet classifier (arguments go to training/train_pets.py), then serve it.
set -euo pipefail
# Paths given (--data, --out) are the caller's, read from the folder it runs in: the scripts are called by their place
here=$(cd "$(dirname "$0")" && pwd)
model=$here/models/pets.pkl  # what the app serves: the model the run writes (--out)
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
      PYTHONPATH="$here" exec python3 "$here/training/train_pets.py" --help;;
  esac
  previous=$arg
done
# The port and the options are checked now, not after the set-up or the training: the library's checks need only
# the standard library
port=${GRADIO_SERVER_PORT:-7860}
PYTHONPATH="$here" python3 -c 'import argparse, sys
from imagelab import UserError, run_cli
from imagelab.app_options import check_listen, port
def check(argv):
    try:
        number = port(sys.argv[2])
    except argparse.ArgumentTypeError as e:
        raise UserError(f"GRADIO_SERVER_PORT: {e}") from None
    check_listen(sys.argv[1], number, how=f"GRADIO_SERVER_PORT={number % 65535 + 1} bash quickstart.sh ...")
run_cli(check)' "${GRADIO_SERVER_NAME:-127.0.0.1}" "$port" || exit 2
PYTHONPATH="$here:$here/training" python3 -c 'from imagelab import run_cli; from train_pets import options
run_cli(options)' "$@" || exit 2
[ -x "$here/.venv/bin/python" ] || python3 -m venv "$here/.venv"
(cd "$here" && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -r requirements.txt)  # its -e .
"$here/.venv/bin/python" "$here/training/train_pets.py" "$@"
exec "$here/.venv/bin/python" "$here/apps/pets/app.py" --model "$model"
