#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for trying `hydra/launcher=slurm` and for the
# test suite: Debian's slurmctld + slurmd + munge, configured for one node with all its CPUs.
#
#   scripts/slurm_cluster.sh up       install (apt-get, once) and start; waits until the node is idle
#   scripts/slurm_cluster.sh down     stop slurmd, slurmctld and munged
#   scripts/slurm_cluster.sh status   print whether it is up (exit 0) or not (exit 1)
#
# Needs root (apt-get, munged as user munge, slurmd). Idempotent: `up` on a running cluster only
# checks it. State, spool, logs and pid files live under $LMLAB_SLURM_DIR (/tmp/lmlab-slurm).
# The config goes to /etc/slurm/slurm.conf (where sinfo/sbatch look) unless a slurm.conf that
# this script did not write is already there: then it refuses rather than touch a real cluster.
set -euo pipefail

RUNTIME="${LMLAB_SLURM_DIR:-/tmp/lmlab-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# written by lmlab scripts/slurm_cluster.sh"
PARTITION="${LMLAB_SLURM_PARTITION:-debug}"
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "slurm_cluster: $*" >&2; }

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        log "needs root (apt-get, munged as user munge, slurmd)"; exit 3
    fi
}

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sinfo munged; do
        command -v "$cmd" >/dev/null 2>&1 || [[ -x /usr/sbin/$cmd ]] || missing+=("$cmd")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >"$RUNTIME/apt.log" 2>&1 || { log "apt-get update failed, see $RUNTIME/apt.log"; exit 4; }
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$RUNTIME/apt.log" 2>&1 \
        || { log "apt-get install failed, see $RUNTIME/apt.log"; exit 4; }
}

alive() {  # alive <pidfile>
    [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
    if alive "$RUNTIME/munged.pid" || pgrep -u munge -x munged >/dev/null 2>&1; then
        return 0
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then  # the package creates it; recreate if it was removed
        mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
        chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged --force
    pgrep -u munge -x munged >"$RUNTIME/munged.pid"
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        log "$CONF exists and was not written by this script; refusing to replace a real cluster's config"
        exit 5
    fi
    local host cpus mem
    host=$(hostname -s)
    # nproc alone obeys OMP_NUM_THREADS (a test run or a user shell that caps threads would
    # declare a 1-CPU node, and a 2-task job would pend forever with "PartitionConfig").
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    # What slurmd itself measures, less a margin, or it drains the node as "low RealMemory".
    mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 9 / 10 ))
    install -d -m 0755 /etc/slurm "$RUNTIME/state" "$RUNTIME/spool" "$RUNTIME/log"
    cat >"$CONF.tmp" <<EOF
$MARK
# Single-node cluster for lmlab's tests and local trials; state under $RUNTIME.
ClusterName=lmlab
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SwitchType=switch/none
ReturnToService=2
StateSaveLocation=$RUNTIME/state
SlurmdSpoolDir=$RUNTIME/spool
SlurmctldPidFile=$RUNTIME/slurmctld.pid
SlurmdPidFile=$RUNTIME/slurmd.pid
SlurmctldLogFile=$RUNTIME/log/slurmctld.log
SlurmdLogFile=$RUNTIME/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Short timeouts: jobs start within a second, a time limit is enforced within a minute.
SchedulerParameters=sched_interval=2
MessageTimeout=10
SlurmctldTimeout=10
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=15
OverTimeLimit=0
Waittime=0
# Requeued jobs (timeout/preemption) may start again after cred_expire seconds (default 120).
JobRequeue=1
AuthInfo=cred_expire=15
# Jobs that ask for no memory get their share per CPU, so several fit at once.
DefMemPerCPU=$(( mem / cpus ))
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF.tmp" "$CONF"
}

node_state() {
    sinfo -h -N -o "%T" 2>/dev/null | head -n1
}

status() {
    local state
    state=$(node_state || true)
    if alive "$RUNTIME/slurmctld.pid" && alive "$RUNTIME/slurmd.pid" && [[ -n $state ]]; then
        echo "up: node $(hostname -s) $state ($(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPUs), partition $PARTITION, runtime $RUNTIME"
        return 0
    fi
    echo "down"
    return 1
}

up() {
    need_root
    install -d -m 0755 "$RUNTIME"
    install_packages
    start_munge
    write_conf
    if ! alive "$RUNTIME/slurmctld.pid"; then
        slurmctld -i  # -i: ignore state from an earlier cluster that is gone
    fi
    if ! alive "$RUNTIME/slurmd.pid"; then
        slurmd
    fi
    local state
    for _ in $(seq 1 60); do
        state=$(node_state || true)
        case "$state" in
            idle|mixed|allocated|completing) status; return 0 ;;
            down*|drain*|*drain) scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    log "the node did not become idle (state: ${state:-none}); logs in $RUNTIME/log"
    tail -n 20 "$RUNTIME/log/slurmctld.log" "$RUNTIME/log/slurmd.log" >&2 || true
    exit 6
}

stop_pidfile() {  # stop_pidfile <pidfile> <name>
    if alive "$1"; then
        local pid
        pid=$(cat "$1")
        kill "$pid"
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && { log "$2 did not stop; sending SIGKILL"; kill -9 "$pid"; }
    fi
    rm -f "$1"
}

down() {
    need_root
    stop_pidfile "$RUNTIME/slurmd.pid" slurmd
    stop_pidfile "$RUNTIME/slurmctld.pid" slurmctld
    if [[ -f $RUNTIME/munged.pid ]]; then
        stop_pidfile "$RUNTIME/munged.pid" munged
    fi
    echo "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
