#!/bin/bash
# Conversion job: a Hugging Face checkpoint -> a Megatron distributed checkpoint (tools/convert_hf_to_megatron.py),
# on one high-memory node, before the training job. Chain the run on it:
#   conv=$(sbatch --parsable slurm/convert.sh --hf /lustre/hf/student_70b --out /lustre/ckpt/student_70b_megatron --tp 8 --pp 4)
#   sbatch --dependency=afterok:$conv slurm/topd_70b.sh
# Arguments are the tool's own (--hf --out [--tp --pp --dtype --verify]). Host memory: see docs/conversion.md.
#SBATCH --job-name=topd-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=topd-convert-%j.out
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
PYTHON=${TRAINER_PYTHON:-python3}
TRAINER_IMAGE=${TRAINER_IMAGE:-}
C=()
if [[ -n $TRAINER_IMAGE ]]; then
  MOUNTS=${MOUNTS:-/lustre:/lustre}
  C=(--container-image="$TRAINER_IMAGE" --container-mounts="$REPO:$REPO${MOUNTS:+,$MOUNTS}" --container-workdir="$REPO")
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
exec srun --ntasks=1 "${C[@]}" "$PYTHON" tools/convert_hf_to_megatron.py "$@"
