#!/usr/bin/env bash
# Sets up a virtualenv with the package and its test extras (CPU torch as the parity reference),
# then runs the whole suite. The README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# pip's byte-compilation of every installed file (torch, transformers, jax: tens of thousands) is
# most of the install's time; Python compiles what the tests import on first use instead, and
# keeps it for the suite's many subprocesses, so bytecode writing must be on.
unset PYTHONDONTWRITEBYTECODE
# torch 2.13.0 first: on the CPU machines that pin resolves to the local CPU build, so the
# `torch>=2.5` of the test extra is already satisfied and no CUDA build is downloaded.
python -m pip install -q --no-compile torch==2.13.0
python -m pip install -q --no-compile -e '.[test]'
# Two workers, one test file at a time each (a file's fixtures are built once): the suite took
# 12-14 minutes that way on two cores, against 15 in one process.
python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "$@"
