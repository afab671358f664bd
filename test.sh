#!/usr/bin/env bash
# Set up what the tests need, then run them: .venv with the pinned requirements, Debian's Chromium for the
# browser tests (Playwright's own browser download cannot work offline). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium > /dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements.txt
# The static Space's runtime from the npm registry, once (pinned, hash-checked): the tests reach only 127.0.0.1.
IMAGELAB_CACHE=build/test-cache .venv/bin/python -m imagelab.onnxruntime_web > /dev/null
exec .venv/bin/python -m pytest "$@"
