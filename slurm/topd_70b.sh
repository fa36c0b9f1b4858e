#!/bin/bash
# TOPD: 70B student (e.g. Llama-3.1-70B / Qwen2.5-72B), co-located teacher. SGLang servers run on their own nodes: start them
# (python -m sglang.launch_server, one per node) and pass rollout.urls=[...] — or let rank 0 launch them when
# GPUs are free for them (rollout.urls empty).
#   sbatch slurm/topd_70b.sh [section.key=value ...]
# Layout: 8 nodes x 8 GPUs = 64 ranks: TP=8 inside a node, PP=4 across nodes, DP=2. bf16 + FP8 (TE, Hopper).
#SBATCH --job-name=topd-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

CONFIG=${CONFIG:-examples/topd_70b.yaml}
CONTAINER=${CONTAINER:-nvcr.io/nvidia/pytorch:25.10-py3}   # has Transformer Engine and apex
MOUNTS=${MOUNTS:-$PWD:/workspace/megatron_topd,/lustre:/lustre}

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=1      # Megatron's TP/SP overlap needs ordered kernel launches
export NCCL_IB_TIMEOUT=22
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

mkdir -p logs
# One task per GPU; megatron_topd.parallel.initialize reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID.
srun --container-image="$CONTAINER" --container-mounts="$MOUNTS" --container-workdir=/workspace/megatron_topd \
  bash -c "pip install -q --no-deps -e . && python -m megatron_topd.cli train --config $CONFIG $*"
