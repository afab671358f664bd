#!/usr/bin/env bash
# Set up .venv, train the pet classifier (arguments go to training/train_pets.py), then serve it.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements.txt
.venv/bin/python training/train_pets.py "$@"
for arg in "$@"; do case "$arg" in -h|--help) exit 0;; esac; done  # train_pets.py's help: nothing trained to serve
exec .venv/bin/python apps/pets/app.py
