#!/usr/bin/env bash
# A one-node Slurm cluster on this host, for tests and trying the Slurm executor.
#
#   deploy/slurm/local-cluster.sh start [STATE_DIR]   # idempotent; prints the env to use
#   deploy/slurm/local-cluster.sh stop  [STATE_DIR]   # idempotent; cancels every job
#   deploy/slurm/local-cluster.sh status [STATE_DIR]
#
# GPUS=N (default 2) sets how many fake GPUs the node has, at the first start of a
# STATE_DIR (the config is kept afterwards).
#
# Everything lives under STATE_DIR (default /tmp/mercato-slurm): munge key and socket,
# slurm.conf, gres.conf, spool and state dirs, logs, pid files, and two character
# devices made with mknod that stand in for GPUs (slurmd refuses a count-only GPU GRES).
# Nothing under /etc is read or written: clients find this cluster through
# SLURM_CONF=STATE_DIR/slurm.conf. munged, slurmctld and slurmd run as root (required
# for slurmd to launch steps as the submitting user). The ports are free ones picked
# at the first start and kept in slurm.conf.
#
# The node: this host as "mercato-node0" (NodeAddr 127.0.0.1), 8 CPUs declared (more
# than a small box has, so several leases' allocations fit; SlurmdParameters=
# config_overrides lets slurmd accept that), Gres=gpu:sim:$GPUS, select/cons_tres with
# CR_CPU, proctrack/linuxproc, no accounting, no cgroups.
set -euo pipefail

cmd="${1:-}"
state="${2:-/tmp/mercato-slurm}"
node_name="mercato-node0"
gpus="${GPUS:-2}"
[[ "$gpus" =~ ^[1-9][0-9]?$ ]] || { echo "local-cluster.sh: GPUS must be 1-99" >&2; exit 1; }

die() { echo "local-cluster.sh: $*" >&2; exit 1; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

write_config() {
    mkdir -p "$state"/{spool,ctld,log,run,dev}
    chmod 0755 "$state" "$state/spool" "$state/ctld"
    for i in $(seq 0 $((gpus - 1))); do
        [ -c "$state/dev/nvidia$i" ] || mknod -m 0666 "$state/dev/nvidia$i" c 195 "$i"
    done
    if [ ! -f "$state/munge.key" ]; then
        head -c 1024 /dev/urandom >"$state/munge.key"
        chmod 0400 "$state/munge.key"
    fi
    [ -f "$state/slurm.conf" ] && return 0
    local ctld_port slurmd_port
    ctld_port="$(free_port)"
    slurmd_port="$(free_port)"
    cat >"$state/gres.conf" <<EOF
NodeName=$node_name Name=gpu Type=sim File=$state/dev/nvidia[0-$((gpus - 1))]
EOF
    cat >"$state/slurm.conf.tmp" <<EOF
ClusterName=mercato
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/munge.socket
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool/%n
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MessageTimeout=10
KillWait=2
InactiveLimit=0
MinJobAge=30
GresTypes=gpu
NodeName=$node_name NodeAddr=127.0.0.1 NodeHostname=$(hostname -s) CPUs=8 RealMemory=4096 Gres=gpu:sim:$gpus State=UNKNOWN
PartitionName=mercato Nodes=$node_name Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$state/slurm.conf.tmp" "$state/slurm.conf"
}

wait_node_idle() {
    export SLURM_CONF="$state/slurm.conf"
    for _ in $(seq 1 100); do
        st="$(sinfo -h -n "$node_name" -o '%t' 2>/dev/null || true)"
        case "$st" in
            idle*|mix*|alloc*) return 0 ;;
            drain*|drng*) scontrol update nodename="$node_name" state=resume >/dev/null 2>&1 || true ;;
            down*) scontrol update nodename="$node_name" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    tail -20 "$state/log/slurmctld.log" "$state/log/slurmd.log" >&2 || true
    die "node $node_name did not come up (state: ${st:-none}); logs above"
}

start() {
    for b in munged slurmctld slurmd sinfo; do
        command -v "$b" >/dev/null 2>&1 || die "$b not found (apt-get install slurm-wlm munge)"
    done
    [ "$(id -u)" = 0 ] || die "must run as root (slurmd launches steps as other users)"
    write_config
    if ! alive "$state/run/munged.pid"; then
        munged --key-file="$state/munge.key" --socket="$state/munge.socket" \
            --pid-file="$state/run/munged.pid" --log-file="$state/log/munged.log" \
            --seed-file="$state/munge.seed" --force
    fi
    export SLURM_CONF="$state/slurm.conf"
    if ! alive "$state/run/slurmctld.pid"; then
        slurmctld -f "$state/slurm.conf" -i
    fi
    if ! alive "$state/run/slurmd.pid"; then
        slurmd -f "$state/slurm.conf" -N "$node_name"
    fi
    wait_node_idle
    echo "SLURM_CONF=$state/slurm.conf"
}

stop() {
    [ -f "$state/slurm.conf" ] || return 0
    export SLURM_CONF="$state/slurm.conf"
    if alive "$state/run/slurmctld.pid"; then
        scancel --full --quiet -p mercato 2>/dev/null || true
    fi
    for d in slurmd slurmctld munged; do
        if alive "$state/run/$d.pid"; then
            pid="$(cat "$state/run/$d.pid")"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$state/run/$d.pid"
    done
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status)
        export SLURM_CONF="$state/slurm.conf"
        sinfo -N -o '%N %t %C %G' && squeue
        ;;
    *) die "usage: $0 start|stop|status [STATE_DIR]" ;;
esac
