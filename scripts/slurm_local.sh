#!/usr/bin/env bash
# A real Slurm 22.05 cluster on this one machine, for tests: slurmctld, slurmdbd (MariaDB) and 3 virtual nodes
# (n1 n2 n3, one slurmd each, 2 CPUs each). Needs root and the Debian packages (make setup-slurm).
#
#   bash scripts/slurm_local.sh start DIR   # config, state and logs under DIR; prints `export SLURM_CONF=...`
#   bash scripts/slurm_local.sh stop DIR    # cancels jobs, stops every daemon started from DIR
#
# Every daemon's pid file lives under DIR, so `stop` ends exactly what `start` started (munged stays: it is shared).
# Ports come from the environment (SLURM_LOCAL_PORT_BASE, default 16800): ctld +0, dbd +1, mariadb +2, slurmd +11..+13.
set -euo pipefail

cmd=${1:?usage: slurm_local.sh start|stop DIR}
dir=$(mkdir -p "${2:?usage: slurm_local.sh start|stop DIR}" && cd "$2" && pwd)
base=${SLURM_LOCAL_PORT_BASE:-16800}
nodes=(n1 n2 n3)
cpus=${SLURM_LOCAL_CPUS:-2}
export SLURM_CONF=$dir/slurm.conf
trap 'echo "slurm_local: failed at line $LINENO: $BASH_COMMAND (logs in $dir/log)" >&2; tail -n 5 "$dir"/log/*.log >&2 || true' ERR

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  for _ in $(seq 1 $((t * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "slurm_local: $what did not come up within ${t}s (logs in $dir/log)" >&2
  return 1
}

stop_pidfile() {  # stop_pidfile FILE: TERM the recorded pid, KILL it after 10 s
  local f=$1 pid
  [[ -s $f ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

start() {
  [[ $(id -u) == 0 ]] || { echo "slurm_local: needs root (daemons, /etc/hosts, munge)" >&2; exit 1; }
  mkdir -p "$dir"/{log,state,spool,run,mysql}
  chmod 755 "$dir"
  if ! runuser -u mysql -- test -x "$dir"; then
    echo "slurm_local: user mysql cannot reach $dir (a parent folder is private): use a folder such as /tmp/x" >&2
    exit 1
  fi
  # Node names resolve on this host, so jobs can use them as addresses (all nodes share one network).
  for n in "${nodes[@]}"; do
    grep -qE "^127\.0\.0\.1[[:space:]].*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
  done

  # munge (shared by every cluster on this host; started once)
  if ! (munge -n | unmunge) >/dev/null 2>&1; then
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    wait_for 20 munged bash -c 'munge -n | unmunge'
  fi

  # MariaDB for slurmdbd: own datadir and socket, TCP on 127.0.0.1 only
  chown -R mysql:mysql "$dir/mysql"
  if [[ ! -d $dir/mysql/data/mysql ]]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$dir/mysql/data" --auth-root-authentication-method=normal \
      >"$dir/log/mariadb-install.log" 2>&1
  fi
  /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$dir/mysql/data" --socket="$dir/mysql/mysqld.sock" \
    --bind-address=127.0.0.1 --port=$((base + 2)) --pid-file="$dir/mysql/mariadb.pid" --skip-name-resolve \
    --innodb-buffer-pool-size=64M --log-error="$dir/log/mariadb.log" </dev/null >>"$dir/log/mariadb.out" 2>&1 &
  wait_for 60 mariadb mariadb --no-defaults --socket="$dir/mysql/mysqld.sock" -uroot -e 'select 1'
  mariadb --no-defaults --socket="$dir/mysql/mysqld.sock" -uroot -e \
    "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"

  cat > "$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$((base + 1))
SlurmUser=root
LogFile=$dir/log/slurmdbd.log
PidFile=$dir/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((base + 2))
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$dir/slurmdbd.conf"

  {
    cat <<EOF
ClusterName=topd
SlurmctldHost=localhost
SlurmctldPort=$((base))
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
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((base + 1))
JobCompType=jobcomp/none
KillWait=30
MinJobAge=600
InactiveLimit=0
EOF
    for i in "${!nodes[@]}"; do
      echo "NodeName=${nodes[$i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((base + 11 + i)) CPUs=$cpus RealMemory=6000 State=UNKNOWN"
    done
    echo "PartitionName=cpu Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP"
  } > "$dir/slurm.conf"

  slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
  wait_for 30 slurmdbd sacctmgr -n show cluster
  sacctmgr -i add cluster topd >/dev/null 2>&1 || true
  slurmctld -f "$dir/slurm.conf"
  for n in "${nodes[@]}"; do mkdir -p "$dir/spool/$n"; slurmd -f "$dir/slurm.conf" -N "$n"; done
  sacctmgr -i add account topd >/dev/null 2>&1 || true
  sacctmgr -i add user root account=topd >/dev/null 2>&1 || true
  wait_for 60 "3 idle nodes" bash -c "[[ \$(sinfo -h -t idle -o %D) == ${#nodes[@]} ]]"
  echo "export SLURM_CONF=$dir/slurm.conf"
}

stop() {
  if [[ -s $dir/run/slurmctld.pid ]] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
    scancel --full -u root 2>/dev/null || true
    for _ in $(seq 1 50); do [[ -z $(squeue -h -t R,CG 2>/dev/null) ]] && break; sleep 0.2; done
  fi
  for n in "${nodes[@]}"; do stop_pidfile "$dir/run/slurmd-$n.pid"; done
  stop_pidfile "$dir/run/slurmctld.pid"
  stop_pidfile "$dir/run/slurmdbd.pid"
  stop_pidfile "$dir/mysql/mariadb.pid"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *) echo "usage: slurm_local.sh start|stop DIR" >&2; exit 2 ;;
esac
