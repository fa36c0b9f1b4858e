#!/bin/bash
# TOPD: 8B student (e.g. Llama-3.1-8B / Qwen3-8B), co-located teacher; examples/topd_8b.yaml.
#   sbatch slurm/topd_8b.sh [section.key=value ...]
# Roles (launch: section of the config): 2 trainer nodes x 8 GPUs (TP=4, PP=1, DP=4; bf16 + FP8 on Hopper),
# 1 student-rollout node (4 SGLang servers at TP=2), 1 teacher node. --nodes must equal the sum.
# Images as in topd_70b.sh (docs/launching.md).
#SBATCH --job-name=topd-8b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=topd-8b-%j.out
export CONFIG=${CONFIG:-examples/topd_8b.yaml}
: "${TRAINER_IMAGE:?set TRAINER_IMAGE to the trainer image (docs/launching.md)}"
: "${SGLANG_IMAGE:?set SGLANG_IMAGE to an SGLang 0.5.23 image (docs/launching.md)}"
export TRAINER_IMAGE SGLANG_IMAGE
export MOUNTS=${MOUNTS:-/lustre:/lustre}
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/job.sh" "$@"
