#!/bin/bash
# The body shared by the sbatch scripts in this folder: one task per GPU, in the NGC PyTorch container.
# Called by them with CONFIG set; extra arguments are dotted config overrides.
set -euo pipefail

: "${CONFIG:?set CONFIG to a YAML config}"
CONTAINER=${CONTAINER:-nvcr.io/nvidia/pytorch:25.10-py3}   # has Transformer Engine and apex
MOUNTS=${MOUNTS:-$PWD:/workspace/megatron_topd,/lustre:/lustre}

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=1      # Megatron's TP/SP overlap needs ordered kernel launches
export NCCL_IB_TIMEOUT=22
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

mkdir -p logs
# One task per GPU; megatron_topd.parallel.initialize reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID.
# The package runs from the mounted checkout (no per-task pip install racing on a shared filesystem).
srun --container-image="$CONTAINER" --container-mounts="$MOUNTS" --container-workdir=/workspace/megatron_topd \
  --export=ALL,PYTHONPATH=/workspace/megatron_topd python -m megatron_topd.cli train --config "$CONFIG" "$@"
