#!/usr/bin/env bash
# A real Slurm 22.05 cluster on this one machine, for tests: slurmctld, slurmdbd (MariaDB) and 4 virtual nodes
# (topdn1..topdn4, one slurmd each, 2 CPUs each), each node in its own Linux network namespace with its own address on
# a private bridge (10.78.0.0/24): binding another node's address fails as on a real cluster (Errno 99) and 127.0.0.1
# is private to the node; each node has its own host name too (UTS namespace). Needs root and the Debian packages
# (make setup-slurm).
#
#   bash scripts/slurm_local.sh start DIR   # config, state and logs under DIR; prints `export SLURM_CONF=...`
#   bash scripts/slurm_local.sh stop DIR    # cancels jobs, kills what is left on every node, removes everything
#
# Leaves nothing behind: `stop` cancels the jobs, waits longer than KillWait, kills by pid whatever is still in a
# node's namespace (a job's processes that Slurm's linuxproc tracking lost), stops the daemons it started (munged
# too, when this script started it), deletes the namespaces, the bridge and its /etc/hosts lines. `start` first does
# the same for an earlier cluster whose run was killed (its folder is kept in /run/topd-slurm-local).
# Ports: the controller, slurmdbd and MariaDB take ports free when the cluster starts (SLURM_LOCAL_PORT_BASE=N fixes
# them to N, N+1, N+2); each slurmd listens on 6818 inside its own namespace, where nothing else runs.
# SLURM_LOCAL_NODES (default 4) nodes; their names and addresses: topdnK, 10.78.0.(10+K); node interface: topd0.
set -euo pipefail

cmd=${1:?usage: slurm_local.sh start|stop DIR}
dir=$(mkdir -p "${2:?usage: slurm_local.sh start|stop DIR}" && cd "$2" && pwd)
count=${SLURM_LOCAL_NODES:-4}
cpus=${SLURM_LOCAL_CPUS:-2}
net=10.78.0
ctl_addr=$net.1
bridge=topdslbr
mark="# topd-slurm-local"
registry=/run/topd-slurm-local
nodes=()
for ((k = 1; k <= count; k++)); do nodes+=("topdn$k"); done
export SLURM_CONF=$dir/slurm.conf
trap 'echo "slurm_local: failed at line $LINENO: $BASH_COMMAND (logs in $dir/log)" >&2; tail -n 5 "$dir"/log/*.log >&2 || true' ERR

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds
  local t=$1 what=$2; shift 2
  local deadline=$((SECONDS + t))
  while ((SECONDS < deadline)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "slurm_local: $what did not come up within ${t}s (logs in $dir/log)" >&2
  return 1
}

kill_pids() {  # kill_pids SECONDS PID...: TERM them, KILL whatever is left after SECONDS
  local t=$1 pid alive; shift
  (($#)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  local deadline=$((SECONDS + t))
  while ((SECONDS < deadline)); do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.2
  done
  kill -KILL "$@" 2>/dev/null || true
}

stop_pidfiles() {  # stop_pidfiles FILE...: end the recorded pids together (TERM, then KILL after 10 s)
  local f pids=()
  for f in "$@"; do [[ -s $f ]] && pids+=("$(cat "$f")"); done
  kill_pids 10 "${pids[@]}"
  rm -f "$@"
}

free_port() {  # a TCP port nothing listens on now (the kernel's choice)
  python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

hosts_without_ours() {  # /etc/hosts rewritten in place (it may be a bind mount: no rename)
  local kept
  kept=$(grep -v -- "$mark" /etc/hosts || true)
  printf '%s\n' "$kept" > /etc/hosts
}

remove_network() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^topdsl-' || true); do
    # shellcheck disable=SC2046  # one pid per word
    kill_pids 10 $(ip netns pids "$ns" 2>/dev/null)
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
  hosts_without_ours
}

stop() {
  if [[ -s $dir/run/slurmctld.pid ]] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
    scancel --full -u root 2>/dev/null || true
    # Jobs get SIGTERM, then SIGKILL after KillWait (10 s): wait a little longer than that.
    local deadline=$((SECONDS + 20))
    while ((SECONDS < deadline)) && [[ -n $(squeue -h 2>/dev/null) ]]; do sleep 0.2; done
  fi

  stop_pidfiles "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid"   # at once: each takes about 2 s
  stop_pidfiles "$dir/run/slurmdbd.pid" "$dir/mysql/mariadb.pid"
  if [[ -e $dir/run/munged.ours ]]; then
    stop_pidfiles /run/munge/munged.pid
    rm -f "$dir/run/munged.ours"
  fi
  remove_network   # and whatever of the jobs is still on a node: every process left in a node's namespace
  if [[ -s $registry && $(cat "$registry") == "$dir" ]]; then rm -f "$registry"; fi
}

start() {
  [[ $(id -u) == 0 ]] || { echo "slurm_local: needs root (daemons, namespaces, /etc/hosts, munge)" >&2; exit 1; }
  # An earlier cluster whose run was killed: stop it first (it holds the names, the bridge and the subnet).
  if [[ -s $registry ]]; then
    local old
    old=$(cat "$registry")
    echo "slurm_local: cleaning up an earlier cluster ($old)" >&2
    if [[ -d $old ]]; then bash "$0" stop "$old" || true; fi
    rm -f "$registry"
  fi
  remove_network
  mkdir -p "$dir"/{log,state,spool,run,mysql} "$(dirname "$registry")"
  echo "$dir" > "$registry"
  chmod 755 "$dir"
  if ! runuser -u mysql -- test -x "$dir"; then
    echo "slurm_local: user mysql cannot reach $dir (a parent folder is private): use a folder such as /tmp/x" >&2
    exit 1
  fi
  local ctld_port dbd_port db_port
  if [[ -n ${SLURM_LOCAL_PORT_BASE:-} ]]; then
    ctld_port=$SLURM_LOCAL_PORT_BASE dbd_port=$((SLURM_LOCAL_PORT_BASE + 1)) db_port=$((SLURM_LOCAL_PORT_BASE + 2))
  else
    ctld_port=$(free_port) dbd_port=$(free_port) db_port=$(free_port)
  fi

  # The network: a bridge with the controller's address, one namespace per node on it (veth pairs).
  ip link add "$bridge" type bridge
  ip addr add "$ctl_addr/24" dev "$bridge"
  ip link set "$bridge" up
  local i n ns
  for i in "${!nodes[@]}"; do
    n=${nodes[$i]} ns=topdsl-${nodes[$i]}
    ip netns add "$ns"
    ip link add "tslh$((i + 1))" type veth peer name "tslc$((i + 1))"
    ip link set "tslc$((i + 1))" netns "$ns"
    ip -n "$ns" link set "tslc$((i + 1))" name topd0
    ip -n "$ns" addr add "$net.$((11 + i))/24" dev topd0
    ip -n "$ns" link set topd0 up
    ip -n "$ns" link set lo up
    ip link set "tslh$((i + 1))" master "$bridge" up
    # One /etc/hosts for every namespace (nsenter keeps the mount namespace): the node names, marked for removal.
    echo "$net.$((11 + i)) $n $mark" >> /etc/hosts
  done

  # munge (started here only if none runs; stopped by `stop` only if started here)
  if ! (munge -n | unmunge) >/dev/null 2>&1; then
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$dir/run/munged.ours"
    wait_for 20 munged bash -c 'munge -n | unmunge'
  fi

  # MariaDB for slurmdbd: own datadir and socket, TCP on 127.0.0.1 only
  chown -R mysql:mysql "$dir/mysql"
  if [[ ! -d $dir/mysql/data/mysql ]]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$dir/mysql/data" --auth-root-authentication-method=normal \
      >"$dir/log/mariadb-install.log" 2>&1
  fi
  /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$dir/mysql/data" --socket="$dir/mysql/mysqld.sock" \
    --bind-address=127.0.0.1 --port="$db_port" --pid-file="$dir/mysql/mariadb.pid" --skip-name-resolve \
    --innodb-buffer-pool-size=64M --log-error="$dir/log/mariadb.log" </dev/null >>"$dir/log/mariadb.out" 2>&1 &
  wait_for 60 mariadb mariadb --no-defaults --socket="$dir/mysql/mysqld.sock" -uroot -e 'select 1'
  mariadb --no-defaults --socket="$dir/mysql/mysqld.sock" -uroot -e \
    "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"

  cat > "$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$dbd_port
SlurmUser=root
LogFile=$dir/log/slurmdbd.log
PidFile=$dir/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$dir/slurmdbd.conf"

  {
    cat <<EOF
ClusterName=topd
SlurmctldHost=localhost($ctl_addr)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=5
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
JobCompType=jobcomp/none
KillWait=10
# Four nodes share this machine's cores with the jobs' trainer ranks and SGLang servers: a slurmd can answer late.
# At the default 10 s, one fault job in a loop of 20 (make test-repeat-job) lost its trainer step on one node:
# slurmctld logged "Nodes topdn1 not responding" (its ping timed out), 18 s later that node's slurmstepd cancelled the
# step's tasks there (SIGTERM, SIGKILL after KillWait) with no kill request in slurmctld's log - srun's check of a
# step reported missing, we read - and the job requeued once more than its faults asked. A dedicated cluster answers
# in milliseconds; 60 s only slows the detection of a node that died.
MessageTimeout=60
MinJobAge=600
InactiveLimit=0
EOF
    for i in "${!nodes[@]}"; do
      echo "NodeName=${nodes[$i]} NodeAddr=$net.$((11 + i)) CPUs=$cpus RealMemory=6000 State=UNKNOWN"
    done
    echo "PartitionName=cpu Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP"
  } > "$dir/slurm.conf"

  slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
  wait_for 30 slurmdbd sacctmgr -n show cluster
  sacctmgr -i add cluster topd >/dev/null 2>&1 || true
  slurmctld -f "$dir/slurm.conf"
  for n in "${nodes[@]}"; do
    mkdir -p "$dir/spool/$n"
    # nsenter, not `ip netns exec`: the latter remounts /sys and slurmd then cannot find its cgroup mount. Its own
    # UTS namespace too, named after the node as on a real cluster: gloo and NCCL advertise the address the host name
    # resolves to (through /etc/hosts: the node's own), not the shared host's name (127.0.0.1 here).
    # shellcheck disable=SC2016  # expanded by the inner bash
    nsenter --net="/var/run/netns/topdsl-$n" unshare --uts bash -c 'hostname "$1" && exec slurmd -f "$2" -N "$1"' \
      slurmd "$n" "$dir/slurm.conf"
  done
  sacctmgr -i add account topd >/dev/null 2>&1 || true
  sacctmgr -i add user root account=topd >/dev/null 2>&1 || true
  wait_for 60 "${#nodes[@]} idle nodes" bash -c "[[ \$(sinfo -h -t idle -o %D) == ${#nodes[@]} ]]"
  echo "export SLURM_CONF=$dir/slurm.conf"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *) echo "usage: slurm_local.sh start|stop DIR" >&2; exit 2 ;;
esac
