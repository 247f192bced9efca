#!/usr/bin/env bash
# A real single-node Slurm for the test suite: munge + slurmctld + slurmd on this host.
#
#   tests/slurm/cluster.sh start    start what is not running; reports when already up
#   tests/slurm/cluster.sh stop     stop the daemons this script started
#   tests/slurm/cluster.sh status   exit 0 when the node answers, 3 when it does not
#
# Needs root and Debian's `slurm-wlm` and `munge` packages. Config, state, logs and pid files
# live in $PIPELINE_SLURM_DIR (default /tmp/pipeline-slurm); nothing global is changed except
# /run/munge (munge's default socket). Clients find this cluster through
#   export SLURM_CONF=$PIPELINE_SLURM_DIR/slurm.conf
# The node declares two *fake* GPUs (gres without devices) so that `--gres=gpu:N` and
# `--gpus=N` can be submitted and allocated here; no GPU is really there.
set -euo pipefail

DIR=${PIPELINE_SLURM_DIR:-/tmp/pipeline-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF
HOST=$(hostname -s)

log() { echo "cluster.sh: $*" >&2; }

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1; }

write_config() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    local cpus mem
    cpus=$(nproc --all)
    # a bit below the machine's memory: slurmd refuses a node that declares more than it has
    mem=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')
    cat >"$CONF.new" <<CONF
# written by tests/slurm/cluster.sh; rewritten on every start
ClusterName=pipeline-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
GresTypes=gpu
MpiDefault=none
ReturnToService=2
# quick turnaround for tests: cancelled jobs get SIGKILL 5 s after SIGTERM
KillWait=5
SchedulerParameters=sched_interval=1
NodeName=$HOST CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
    # fake GPUs: links to /dev/null stand in for /dev/nvidia0,1 (slurmd wants character
    # devices); their index is what slurmd puts into CUDA_VISIBLE_DEVICES
    ln -sfn /dev/null "$DIR/fake-gpu0"
    ln -sfn /dev/null "$DIR/fake-gpu1"
    echo "NodeName=$HOST Name=gpu File=$DIR/fake-gpu[0-1]" >"$DIR/gres.conf.new"
    mv "$CONF.new" "$CONF"
    mv "$DIR/gres.conf.new" "$DIR/gres.conf"
}

start_munge() {
    if munge_ok; then return; fi
    command -v munged >/dev/null || { log "munged not found (apt-get install munge)"; exit 1; }
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey -c
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    # the daemons must not inherit fd 9 (the lock): munged would hold it forever
    runuser -u munge -- /usr/sbin/munged 9>&-
    touch "$DIR/munge.started"
    for _ in $(seq 50); do munge_ok && return; sleep 0.1; done
    log "munged did not answer"; exit 1
}

start() {
    for bin in slurmctld slurmd sinfo munged; do
        command -v "$bin" >/dev/null || { log "$bin not found: apt-get install slurm-wlm munge"; exit 1; }
    done
    if pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid" && munge_ok; then
        log "already running ($(node_state)); export SLURM_CONF=$CONF"
        return 0
    fi
    mkdir -p "$DIR"
    if ! pid_alive "$DIR/slurmctld.pid" && ! pid_alive "$DIR/slurmd.pid"; then
        write_config
    fi
    start_munge
    pid_alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF" 9>&-
    pid_alive "$DIR/slurmd.pid" || slurmd -f "$CONF" 9>&-
    local state=""
    for _ in $(seq 100); do
        state=$(node_state)
        case "$state" in
            idle* | mixed* | allocated*) break ;;
            down* | drain*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    case "$state" in
        idle* | mixed* | allocated*) log "up: node $HOST $state; export SLURM_CONF=$CONF" ;;
        *) log "node $HOST is '${state:-unknown}'; see $DIR/log"; exit 1 ;;
    esac
}

stop_pid() {
    local file=$1 pid
    pid_alive "$file" || return 0
    pid=$(cat "$file")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    if pid_alive "$DIR/slurmctld.pid"; then
        # jobs of a stopped cluster would linger as orphans: cancel them first
        scancel --full --quiet --partition=debug 2>/dev/null || true
    fi
    stop_pid "$DIR/slurmd.pid"
    stop_pid "$DIR/slurmctld.pid"
    if [ -e "$DIR/munge.started" ]; then
        stop_pid /run/munge/munged.pid
        rm -f "$DIR/munge.started"
    fi
    log "stopped"
}

status() {
    local ctld=no slurmd=no munge=no
    pid_alive "$DIR/slurmctld.pid" && ctld=yes
    pid_alive "$DIR/slurmd.pid" && slurmd=yes
    munge_ok && munge=yes
    echo "SLURM_CONF=$CONF munge=$munge slurmctld=$ctld slurmd=$slurmd node=$(node_state || true)"
    [ "$ctld$slurmd$munge" = yesyesyes ] || return 3
    sinfo
}

lock() {
    # two test sessions starting (or one stopping) at once would trip over each other
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    # a daemon started by an older version of this script may still hold it: go on after a while
    flock -w 60 9 || log "lock $DIR/.lock still held after 60 s; going on"
}

case "${1:-}" in
    start) lock; start ;;
    stop) lock; stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
