#!/usr/bin/env bash
# The GPU checks of issues 2 and 3, run as one prepared script on a single-GPU machine (the device tool's H200):
#   bash scripts/gpu_checks.sh      (expects megatron-core's wheel in .whl/ when it is not installed)
# Writes logs and JSON figures under $OUT (default: runs/gpu_checks).
set -uo pipefail
OUT=${OUT:-runs/gpu_checks}
mkdir -p "$OUT"
if ! python3 -c "import megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
status=0
timeout 300 python3 benchmarks/gpu_losses.py 2>&1 | tee "$OUT/losses_gpu.log" || status=1
timeout 200 python3 scripts/gpu_check_trainer.py 2>&1 | tee "$OUT/trainer_gpu.log" || status=1
exit $status
