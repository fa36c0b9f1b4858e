#!/bin/bash
# The body shared by the sbatch scripts in this folder: one allocation split into roles by node index.
#
#   trainer nodes (first launch.trainer_nodes)  srun, one task per rank    python -m megatron_topd.launch.trainer
#   student nodes (next launch.student_nodes)   srun, one task per node    python -m megatron_topd.launch.serve --role student
#   teacher nodes (last launch.teacher_nodes)   srun, one task per node    python -m megatron_topd.launch.serve --role teacher
#
# Servers bind their node's name and publish their URL under <run_dir>/endpoints/<role>/ once healthy; the trainer
# waits for all of them. With launch.student_nodes=0 only the trainer runs and its rank 0 launches the servers.
# A SIGUSR1 to this script (--signal=B:USR1@<s>, or `scancel --signal=USR1 --batch <job>`) becomes <endpoints>/stop:
# the trainer finishes the step, checkpoints and exits 75; this script then requeues the job, which resumes.
# A server that dies mid-run ends the attempt the same way (trainer.exit 75, bounded: launch.max_server_requeues).
#
# Called by the topd_*.sh scripts with CONFIG set; extra arguments are dotted config overrides.
# Environment: TRAINER_IMAGE / SGLANG_IMAGE (pyxis images, e.g. nvcr.io#nvidia/pytorch:25.10-py3-based builds; empty:
# no container), MOUNTS (extra container mounts), TRAINER_PYTHON / SERVER_PYTHON (interpreters inside them),
# TOPD_DRYRUN=1 (print the plan and the srun lines instead of running them; needs SLURM_JOB_NODELIST).
set -euo pipefail

: "${CONFIG:?set CONFIG to a YAML config}"
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
TRAINER_PYTHON=${TRAINER_PYTHON:-python3}
SERVER_PYTHON=${SERVER_PYTHON:-python3}
TRAINER_IMAGE=${TRAINER_IMAGE:-}
SGLANG_IMAGE=${SGLANG_IMAGE:-}
MOUNTS=${MOUNTS:-}
DRYRUN=${TOPD_DRYRUN:-0}

# The code every attempt runs: megatron_topd/ and slurm/ copied to $CODE when the job first starts, so an edit to the
# checkout while the job runs or waits to be requeued does not change it; every attempt runs this script from there.
# PYTHONSAFEPATH=1 (Python >= 3.11) keeps `python -m` from putting the working directory, the live checkout, first on
# sys.path; each role checks that it runs from $CODE (megatron_topd/launch/snapshot.py). Removed when the job ends.
CODE=$REPO
if [[ $DRYRUN != 1 ]]; then
  CODE=${TOPD_CODE_DIR:-$REPO/runs/code/job-${SLURM_JOB_ID:?not inside a Slurm job}}
  if [[ ! -f $CODE/.complete ]]; then
    rm -rf "$CODE" && mkdir -p "$CODE"
    tar -C "$REPO" --exclude=__pycache__ -cf - megatron_topd slurm | tar -C "$CODE" -xf -
    touch "$CODE/.complete"
  fi
  if [[ ${TOPD_RUNNING_FROM:-} != "$CODE" ]]; then TOPD_RUNNING_FROM=$CODE exec bash "$CODE/slurm/job.sh" "$@"; fi
  export TOPD_CODE_DIR=$CODE PYTHONSAFEPATH=1
fi
export PYTHONPATH=$CODE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export CUDA_DEVICE_MAX_CONNECTIONS=1      # Megatron's TP/SP overlap needs ordered kernel launches
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}

# Container flags for one role's steps (pyxis); the repo is mounted at the same path, so every path is the same
# inside and outside.
container() {
  local image=$1
  [[ -z $image ]] && return 0
  printf '%s\n' "--container-image=$image" "--container-mounts=$REPO:$REPO${MOUNTS:+,$MOUNTS}" \
    "--container-workdir=$REPO"
}
mapfile -t TRAINER_C < <(container "$TRAINER_IMAGE")
mapfile -t SGLANG_C < <(container "$SGLANG_IMAGE")
# Without images, BARE_TASKS=1 runs each role's command through slurm/bare_task.sh: its own mount namespace with
# Slurm's client, config and munge socket masked, i.e. what a task sees in a stock image (the CPU job does).
WRAP=()
if [[ ${BARE_TASKS:-0} == 1 && -z $TRAINER_IMAGE$SGLANG_IMAGE ]]; then WRAP=(bash "$CODE/slurm/bare_task.sh"); fi

run() {  # run a command, or print it under TOPD_DRYRUN=1
  local line
  if [[ $DRYRUN == 1 ]]; then line=$(printf "%q " "$@"); echo "$line"; else "$@"; fi   # one write: background steps never mix lines
}

# A stop request (SIGUSR1) may come at any time, even before the trainer runs: trapped from the start (untrapped,
# it would kill this script) and turned into the file <endpoints>/stop, which every trainer rank checks after each
# step (the same point where it would act on a signal). Not forwarded as a signal: a task that has not yet installed
# its handler dies of SIGUSR1 (seen: a trainer step 0.5 s old killed by it), and srun does not forward it anyway.
stop_requested=0
attempt="${SLURM_JOB_ID:-0}.${SLURM_RESTART_COUNT:-0}"   # as megatron_topd.launch.endpoints.attempt_id()
# shellcheck disable=SC2317  # called by the trap
request_stop() {
  stop_requested=1
  echo "[job] SIGUSR1: the trainer stops after its current step"
  [[ -n ${ENDPOINTS:-} && -d $ENDPOINTS ]] || return 0    # not planned yet: written once the folder exists
  printf '{"attempt": "%s"}\n' "$attempt" > "$ENDPOINTS/.stop.tmp" && mv "$ENDPOINTS/.stop.tmp" "$ENDPOINTS/stop"
}
trap request_stop USR1

# 1. The plan: validate the whole config and split the nodes (in the trainer image: it holds the config's code).
: "${SLURM_JOB_NODELIST:?not inside a Slurm allocation (set SLURM_JOB_NODELIST for TOPD_DRYRUN=1)}"
first_node() {  # the first name of a Slurm host list, without Slurm's client: n[08-11],gpu1 -> n08
  local rest=$1 name=""
  while [[ $rest =~ ^([^],[]*)\[([0-9]+)[^]]*\](.*)$ ]]; do
    name+=${BASH_REMATCH[1]}${BASH_REMATCH[2]} rest=${BASH_REMATCH[3]}
  done
  echo "$name${rest%%,*}"
}
first_node=$(first_node "$SLURM_JOB_NODELIST")
if [[ $DRYRUN == 1 ]]; then   # the step it would run, then the plan on this host
  run srun --job-name=plan --nodes=1 --ntasks=1 --nodelist="$first_node" "${TRAINER_C[@]}" "${WRAP[@]}" \
    "$TRAINER_PYTHON" -m megatron_topd.launch.plan --config "$CONFIG" "$@"
  plan=$("$TRAINER_PYTHON" -m megatron_topd.launch.plan --config "$CONFIG" "$@")
else
  plan=$(srun --job-name=plan --nodes=1 --ntasks=1 --nodelist="$first_node" "${TRAINER_C[@]}" "${WRAP[@]}" \
    "$TRAINER_PYTHON" -m megatron_topd.launch.plan --config "$CONFIG" "$@")
fi
eval "$plan"

# One job per output_dir: a second one would wipe this one's endpoints and write into its checkpoints. The first holds
# <run_dir>/.job.lock (its job id) until it ends, across its requeues; a later job fails here naming the holder.
lock_run_dir() {  # lock_run_dir DIR JOB_ID
  local lock=$1/.job.lock holder state
  mkdir -p "$1"
  for _ in 1 2; do
    if (set -o noclobber; echo "$2" > "$lock") 2>/dev/null; then return 0; fi
    holder=$(cat "$lock" 2>/dev/null || true)
    [[ $holder == "$2" ]] && return 0     # this job's earlier attempt
    state=$(squeue -h -j "$holder" -o %T 2>/dev/null || true)
    if [[ $state =~ ^(PENDING|RUNNING|REQUEUED|REQUEUE_HOLD|REQUEUE_FED|SUSPENDED|COMPLETING|CONFIGURING|RESIZING|SIGNALING|STAGE_OUT)$ ]]; then
      echo "[job] train.output_dir $1 is in use by Slurm job $holder ($state), which holds $lock: one job per" \
        "output_dir; wait for it, cancel it (scancel $holder), or give this job another train.output_dir" >&2
      return 1
    fi
    rm -f "$lock"                         # its job ended without releasing it
  done
  return 1
}
[[ $DRYRUN == 1 ]] || lock_run_dir "$RUN_DIR" "$SLURM_JOB_ID"
echo "[job] attempt $attempt: trainer=$TRAINER_NODES student=${STUDENT_NODES:-rank0} teacher=${TEACHER_NODES:-rank0}" \
  "run_dir=$RUN_DIR logs=$LOGS"
[[ $DRYRUN == 1 ]] || { rm -rf "$ENDPOINTS"; mkdir -p "$ENDPOINTS" "$LOGS"; }
(( stop_requested )) && request_stop     # the signal came during the plan
# The allocation's end, read here on the host (tasks have no Slurm client): the trainer stops with a checkpoint when
# less time is left than a step and a save take (megatron_topd/launch/deadline.py). None without a time limit. Read
# again every TOPD_JOB_END_POLL_S seconds while the job runs: `scontrol update TimeLimit=...` and preemption with
# GraceTime (end = now + GraceTime) move it.
write_job_end() {
  local end
  end=$(squeue -h -j "${SLURM_JOB_ID:-0}" -o %e 2>/dev/null || true)
  [[ $end =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T ]] || return 0
  end=$(date -d "$end" +%s)
  [[ $end == "${job_end:-}" ]] && return 0
  job_end=$end
  printf '{"end": %d, "attempt": "%s"}\n' "$end" "$attempt" > "$ENDPOINTS/.job_end.tmp"
  mv "$ENDPOINTS/.job_end.tmp" "$ENDPOINTS/job_end"
}
refresher=()
if [[ $DRYRUN != 1 ]]; then
  write_job_end
  (
    nap=""; trap '' USR1; trap 'kill "$nap" 2>/dev/null; exit 0' TERM    # killed below, with its sleep
    while :; do sleep "${TOPD_JOB_END_POLL_S:-10}" & nap=$!; wait "$nap"; write_job_end; done
  ) &
  refresher=($!)
fi
GPU_ARGS=()
if (( GPUS_PER_NODE > 0 )); then GPU_ARGS=(--gpus-per-node="$GPUS_PER_NODE"); fi

# 2. Server roles (their own nodes), in the background.
server_pids=()
if (( N_STUDENT > 0 )); then
  for role in student teacher; do
    if [[ $role == student ]]; then nodes=$STUDENT_NODES n=$N_STUDENT; else nodes=$TEACHER_NODES n=$N_TEACHER; fi
    run srun --job-name="$role" --nodes="$n" --ntasks="$n" --ntasks-per-node=1 --nodelist="$nodes" "${GPU_ARGS[@]}" \
      --output="$LOGS/$role.log" --open-mode=append "${SGLANG_C[@]}" "${WRAP[@]}" \
      "$SERVER_PYTHON" -m megatron_topd.launch.serve --role "$role" --config "$CONFIG" "$@" &
    server_pids+=($!)
  done
fi

# 3. The trainer: one task per rank; a stop request reaches it through request_stop above.
run srun --job-name=trainer --nodes="$N_TRAINER" --ntasks=$((N_TRAINER * TASKS_PER_NODE)) \
  --ntasks-per-node="$TASKS_PER_NODE" --nodelist="$TRAINER_NODES" \
  "${GPU_ARGS[@]}" --kill-on-bad-exit=1 --label --output="$LOGS/trainer.log" --open-mode=append "${TRAINER_C[@]}" \
  --export=ALL,MASTER_ADDR="$MASTER_ADDR",MASTER_PORT="$MASTER_PORT" "${WRAP[@]}" \
  "$TRAINER_PYTHON" -m megatron_topd.launch.trainer --config "$CONFIG" "$@" &
trainer=$!

set +e
while :; do
  wait "$trainer"; rc=$?
  kill -0 "$trainer" 2>/dev/null || break   # still running: the wait was cut short by the trap
done
set -e
echo "[job] trainer exited with $rc"
[[ $DRYRUN == 1 ]] && exit 0
kill "${refresher[@]}" 2>/dev/null || true

# 4. Servers stop on the trainer's exit file. Rank 0 writes it (75 = stopped on request, checkpoint saved; the
#    processes then exit 0); a rank that found a server dead writes 75 too and exits 75, srun ending the other ranks
#    (launch/server_loss.py); written here when the step failed or the trainer died without writing it.
written=$(grep -o "\"code\": *[0-9-]*, *\"attempt\": *\"$attempt\"" "$ENDPOINTS/trainer.exit" 2>/dev/null || true)
if [[ $written =~ \"code\":\ *75, ]]; then
  rc=75
elif (( rc != 0 )) || [[ -z $written ]]; then
  printf '{"code": %d, "attempt": "%s"}\n' "$rc" "$attempt" > "$ENDPOINTS/.trainer.exit.tmp"
  mv "$ENDPOINTS/.trainer.exit.tmp" "$ENDPOINTS/trainer.exit"
fi
for _ in $(seq 1 60); do
  alive=0
  for pid in "${server_pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  (( alive )) || break
  sleep 1
done
for pid in "${server_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
wait || true

# 5. Stopped on request after a checkpoint: requeue (the next attempt resumes from it, with the same code and lock).
#    Otherwise the job is over: release the output_dir and remove the code snapshot.
if (( rc != 75 )); then
  rm -f "$RUN_DIR/.job.lock"
  [[ $CODE == "$REPO" ]] || rm -rf "$CODE"
fi
if (( rc == 75 )); then
  echo "[job] requeueing $SLURM_JOB_ID (restart count ${SLURM_RESTART_COUNT:-0})"
  # Preempted with PreemptMode=REQUEUE, Slurm requeues the job itself: then this one may be refused, harmlessly.
  scontrol requeue "$SLURM_JOB_ID" || echo "[job] scontrol requeue refused: Slurm requeues the job itself"
  exit 0
fi
exit "$rc"
