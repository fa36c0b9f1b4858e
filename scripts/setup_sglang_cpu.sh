#!/usr/bin/env bash
# Build the SGLang CPU environment (.venv-sglang) from nothing.
# `pip install sglang==0.5.23` cannot resolve on a CPU machine (it pins a CUDA torch and GPU-only kernels), so:
# CPU torch from the pin, sglang's non-GPU requirements, then sglang and torchvision without their dependencies.
# The two CPU shims the server needs at run time live in megatron_topd/rollout/cpu_shims/ (see its README).
# On GPU clusters use the normal `pip install sglang==0.5.23` instead of this script.
set -euo pipefail
PYTHON=${1:-python3.11}
VENV=${2:-.venv-sglang}
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
"$PIP" install -q -c requirements/pin.txt torch==2.13.0
"$PIP" install -q -c requirements/pin.txt -r requirements/sglang-cpu.txt
"$PIP" install -q -c requirements/pin.txt --no-deps sglang==0.5.23 torchvision==0.28.0
# Check with the CPU shims on the path, exactly as SGLangServer launches it on CPU (torchvision fails without them).
SHIMS="$(cd "$(dirname "$0")/.." && pwd)/megatron_topd/rollout/cpu_shims"
SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$SHIMS${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -c \
  "import sglang, torch, torchvision, sglang.srt.entrypoints.http_server; print('sglang', sglang.__version__, 'torch', torch.__version__)"
