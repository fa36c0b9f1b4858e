#!/bin/bash
# TOPD: 8B student (e.g. Llama-3.1-8B / Qwen3-8B), co-located teacher. SGLang servers run on their own nodes: start them
# (python -m sglang.launch_server, one per node) and pass rollout.urls=[...] — or let rank 0 launch them when
# GPUs are free for them (rollout.urls empty).
#   sbatch slurm/topd_8b.sh [section.key=value ...]
# Layout: 2 nodes x 8 GPUs = 16 ranks: TP=4, PP=1, DP=4. bf16 + FP8 (TE, Hopper).
#SBATCH --job-name=topd-8b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
export CONFIG=${CONFIG:-examples/topd_8b.yaml}
# sbatch runs a copy of this script: find the repo through the submit directory.
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh" "$@"
