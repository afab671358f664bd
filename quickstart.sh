#!/usr/bin/env bash
# Set up .venv, train the pet classifier (arguments go to training/train_pets.py), then serve it.
set -euo pipefail
cd "$(dirname "$0")"
for arg in "$@"; do  # the options are parsed with the standard library alone: nothing to install, train or serve
  case "$arg" in -h|--help) PYTHONPATH=. exec python3 training/train_pets.py --help;; esac
done
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements.txt
.venv/bin/python training/train_pets.py "$@"
exec .venv/bin/python apps/pets/app.py
