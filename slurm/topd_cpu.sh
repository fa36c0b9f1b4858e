#!/bin/bash
# TOPD on the CPU, split into roles: 2 trainer nodes (2 ranks each: TP=2 inside a node, DP=2 across nodes, gloo),
# 1 student-server node, 1 teacher-server node (examples/topd_cpu_slurm.yaml). Tiny models; the tests run it on a local
# Slurm cluster whose nodes have their own network stacks (scripts/slurm_local.sh). Each role's task runs as in a stock
# container image (slurm/bare_task.sh: no Slurm client, config or munge socket), in place of pyxis.
#   sbatch slurm/topd_cpu.sh train.student_checkpoint=... [section.key=value ...]
# Without asset overrides, the CPU demo's tiny models are built first (under runs/demo/assets).
#SBATCH --job-name=topd-cpu
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=2
#SBATCH --exclusive
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=topd-cpu-%j.out
REPO=${SLURM_SUBMIT_DIR:-$PWD}
export CONFIG=${CONFIG:-$REPO/examples/topd_cpu_slurm.yaml}
export TRAINER_PYTHON=${TRAINER_PYTHON:-$REPO/.venv/bin/python}
export SERVER_PYTHON=${SERVER_PYTHON:-$REPO/.venv/bin/python}   # runs the role; SGLang itself: rollout.server_python
export OMP_NUM_THREADS=1
export BARE_TASKS=${BARE_TASKS:-1}
if [[ " $* " != *" train.student_checkpoint="* ]]; then
  assets=$REPO/runs/demo/assets
  srun --nodes=1 --ntasks=1 --job-name=assets "$TRAINER_PYTHON" -c \
    "import sys; sys.path.insert(0, '$REPO'); from megatron_topd.demo import build_assets; from pathlib import Path; build_assets(Path('$assets'))"
  set -- "train.student_checkpoint=$assets/student_megatron" "train.student_hf_path=$assets/student_hf" \
    "teacher.checkpoint=$assets/teacher_megatron" "teacher.hf_path=$assets/teacher_hf" \
    "train.prompts_path=$assets/prompts.jsonl" "$@"
fi
exec bash "$REPO/slurm/job.sh" "$@"
