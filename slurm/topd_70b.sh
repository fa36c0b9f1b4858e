#!/bin/bash
# TOPD: 70B student (e.g. Llama-3.1-70B / Qwen2.5-72B), co-located teacher; examples/topd_70b.yaml.
#   sbatch slurm/topd_70b.sh [section.key=value ...]
# Roles (launch: section of the config): 8 trainer nodes x 8 GPUs (TP=8, PP=4, DP=2; bf16 + FP8 on Hopper),
# 8 student-rollout nodes (one SGLang server at TP=8 each), 1 teacher node (SGLang for near-future windows).
# --nodes must equal the sum; change both together. Images (pyxis; docs/launching.md says how to build them):
#   TRAINER_IMAGE  built FROM nvcr.io#nvidia/pytorch:25.10-py3 + requirements/trainer.txt + megatron-core
#   SGLANG_IMAGE   nvcr.io#nvidia/sglang:<tag with sglang 0.5.23> (or any image with sglang==0.5.23)
#SBATCH --job-name=topd-70b
#SBATCH --nodes=17
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=topd-70b-%j.out
export CONFIG=${CONFIG:-examples/topd_70b.yaml}
: "${TRAINER_IMAGE:?set TRAINER_IMAGE to the trainer image (docs/launching.md)}"
: "${SGLANG_IMAGE:?set SGLANG_IMAGE to an SGLang 0.5.23 image (docs/launching.md)}"
export TRAINER_IMAGE SGLANG_IMAGE
export MOUNTS=${MOUNTS:-/lustre:/lustre}
# sbatch runs a copy of this script: find the repo through the submit directory.
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/job.sh" "$@"
