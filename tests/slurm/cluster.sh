#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the Slurm test tier (tests/test_slurm.py):
#   tests/slurm/cluster.sh start DIR   # writes DIR/slurm.conf for this host, starts munged,
#                                      # slurmctld and slurmd, waits until the node is idle
#   export SLURM_CONF=DIR/slurm.conf   # what sbatch, squeue, scontrol (and submitit) read
#   tests/slurm/cluster.sh stop DIR    # cancels the jobs and stops the three daemons
# Everything lives in DIR (config, state, munge key and socket, logs): nothing under /etc is
# touched, and two clusters on one machine do not meet (each takes two free ports). Slurm
# runs its daemons as root, so `start` needs root. Needs Debian's slurm-wlm and munge
# (`apt-get install -y slurm-wlm munge`).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(realpath -m "$2")
conf=$dir/slurm.conf
export SLURM_CONF=$conf

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

stop_pid() {  # stop_pid PIDFILE: TERM, then KILL after 10 s
  local file=$1 pid
  [[ -f $file ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

start() {
  [[ $(id -u) -eq 0 ]] || { echo "cluster.sh start needs root (Slurm's daemons run as root)" >&2; exit 1; }
  mkdir -p "$dir"/{munge,state,spool,log}
  chmod 700 "$dir/munge"
  local host cpus mem_mb
  host=$(hostname -s)
  cpus=$(nproc)
  # What slurmd reports, less a margin: a node that claims more than it has is drained.
  mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

  [[ -f $dir/munge/munge.key ]] || { head -c 1024 /dev/urandom > "$dir/munge/munge.key"; chmod 400 "$dir/munge/munge.key"; }
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"

  cat > "$conf" <<EOF
# Written by tests/slurm/cluster.sh for $host ($cpus CPUs, $mem_mb MB).
ClusterName=vitexp-test
SlurmctldHost=$host
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  # -i: ignore state a previous cluster in DIR may have left.
  slurmctld -i
  slurmd
  for _ in $(seq 150); do
    state=$(sinfo -h -o %T 2>/dev/null | head -n1 || true)
    [[ $state == idle ]] && { echo "SLURM_CONF=$conf"; return 0; }
    sleep 0.2
  done
  echo "the Slurm node did not become idle (state: ${state:-none}); logs in $dir/log" >&2
  stop
  exit 1
}

stop() {
  if [[ -f $conf ]]; then
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
  fi
  stop_pid "$dir/slurmd.pid"
  stop_pid "$dir/slurmctld.pid"
  stop_pid "$dir/munge/munged.pid"
}

case $action in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
