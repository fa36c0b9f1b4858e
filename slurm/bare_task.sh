#!/bin/bash
# Run a role's command as it would run in a stock container image (pyxis on a real cluster): in its own mount
# namespace, with Slurm's client commands, its config and munge's socket out of sight. The CPU job (topd_cpu.sh) uses
# it in place of --container-image, so the tests see what a task in an NGC image sees: no scontrol, no slurm.conf, no
# munge. What a task needs of Slurm comes from its SLURM_* variables.
#   bash slurm/bare_task.sh COMMAND [ARG...]
# On entry it checks the masking took (scontrol must not run) and says so in the role's log; a task that could still
# reach Slurm's client fails at once (the rehearsal would prove nothing).
# HOME stays visible: on the test machine the venvs' interpreter lives under /root/.pyenv.
set -euo pipefail
if [[ ${TOPD_BARE_TASK:-0} != 1 ]]; then
  exec unshare --mount --propagation private env TOPD_BARE_TASK=1 bash "$0" "$@"
fi
for tool in scontrol srun sbatch salloc sattach squeue scancel sinfo sacct sacctmgr sstat sprio sshare sreport sbcast \
  strigger sdiag; do
  if path=$(command -v "$tool"); then mount --bind /dev/null "$path"; fi
done
for folder in /etc/slurm /etc/slurm-llnl /run/munge /var/run/munge "$(dirname "${SLURM_CONF:-/etc/slurm/slurm.conf}")"; do
  [[ -d $folder && $folder != / && $PWD/ != "$folder"/* ]] || continue   # never the working directory
  mount -t tmpfs -o size=1m,mode=755 tmpfs "$folder"
done
if msg=$(scontrol show config 2>&1 | head -n 1); then
  echo "[bare task $(hostname)/${SLURMD_NODENAME:-?}] scontrol still runs: the masking failed" >&2
  exit 1
fi
echo "[bare task ${SLURMD_NODENAME:-?} rank ${SLURM_PROCID:-?}] no Slurm client here: scontrol: ${msg:-refused}" >&2
exec "$@"
