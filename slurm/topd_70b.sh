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
export CONFIG=${CONFIG:-examples/topd_70b.yaml}
# sbatch runs a copy of this script: find the repo through the submit directory.
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh" "$@"
