#!/usr/bin/env bash
# Sets up a virtualenv with the package and its test extras (CPU torch as the parity reference),
# then runs the whole suite. The README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# torch 2.13.0 first: on the CPU machines that pin resolves to the local CPU build, so the
# `torch>=2.5` of the test extra is already satisfied and no CUDA build is downloaded.
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'
python -m pytest -q -p no:cacheprovider "$@"
