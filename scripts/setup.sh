#!/usr/bin/env bash
# Installs mezo_dist and its dependencies on a fresh machine. torch goes first, pinned, so that
# no later step pulls a CUDA build of torch onto a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints.txt -e ".[dev]"
