#!/usr/bin/env bash
# A real single-node Slurm cluster from Debian's packages, for testing the slurm profile.
#   tests/slurm/cluster.sh start   install (if needed), configure and start munge, slurmctld, slurmd
#   tests/slurm/cluster.sh stop    stop the daemons by the PIDs in their pid files, remove its slurm.conf
#   tests/slurm/cluster.sh check   exit 0 if this machine can run it (root, Debian, apt), else print why
# The node has two fake GPUs (gres gpu backed by /dev/null and /dev/zero) and two partitions, cpu (default) and
# gpu, so the GPU mapping of the profile can be tested on a machine without GPUs.
set -euo pipefail
CONF=/etc/slurm
STATE=/var/lib/slurm
RUN=/run/slurm-mergemix
LOGS=/var/log/slurm

check() {
    [ "$(id -u)" = 0 ] || { echo "needs root (installs packages, starts daemons)"; return 1; }
    [ -f /etc/debian_version ] || { echo "needs a Debian machine (apt packages munge, slurmctld, slurmd)"; return 1; }
    command -v apt-get >/dev/null || { echo "needs apt-get"; return 1; }
    return 0
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq munge slurmctld slurmd slurm-client >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1
        apt-get install -y -qq munge slurmctld slurmd slurm-client >/dev/null
    }
}

configure() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
    mkdir -p "$CONF" "$STATE" "$RUN" "$LOGS"
    rm -rf "${STATE:?}"/*
    mkdir -p "$STATE/ctld" "$STATE/d"
    cat > "$CONF/slurm.conf" <<CONFEOF
ClusterName=mergemix-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
# the plugin polls squeue (no slurmdbd here): keep finished jobs visible well past its interval
MinJobAge=600
ReturnToService=2
SchedulerParameters=sched_interval=1
NodeName=$host CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host Default=NO MaxTime=INFINITE State=UP
CONFEOF
    # two fake GPUs (character devices that exist everywhere), so two GPU jobs can run at once
    printf 'NodeName=%s Name=gpu File=/dev/null\nNodeName=%s Name=gpu File=/dev/zero\n' "$host" "$host" > "$CONF/gres.conf"
}

start_munge() {
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        su -s /bin/sh munge -c "/usr/sbin/munged --force" || runuser -u munge -- /usr/sbin/munged --force
    fi
    for _ in $(seq 1 50); do  # munged returns before its socket exists
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "munged did not answer" >&2
    return 1
}

start() {
    check
    install
    stop >/dev/null 2>&1 || true
    configure
    start_munge
    /usr/sbin/slurmctld
    /usr/sbin/slurmd
    for _ in $(seq 1 100); do
        state=$(sinfo -h -N -o %T 2>/dev/null | head -n1 || true)
        if [ "$state" = idle ]; then
            echo "slurm up: $(sinfo -h -o '%P %D %t %G' | tr '\n' ';')"
            return 0
        fi
        sleep 0.3
    done
    echo "node did not become idle (state: ${state:-none}); see $LOGS" >&2
    tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
    return 1
}

stop() {
    for f in "$RUN/slurmd.pid" "$RUN/slurmctld.pid"; do
        if [ -s "$f" ]; then
            kill "$(cat "$f")" 2>/dev/null || true
            rm -f "$f"
        fi
    done
    sleep 0.5
    # Remove the configuration this script wrote (never another one): left behind, it points every
    # Slurm client at a stopped controller, and each `scontrol show config` (which the slurm executor
    # plugin runs whenever Snakemake starts, even for a local run) then retries for 10 s.
    if grep -qs '^ClusterName=mergemix-ci$' "$CONF/slurm.conf"; then
        rm -f "$CONF/slurm.conf" "$CONF/gres.conf"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    check) check ;;
    *) echo "usage: $0 start|stop|check" >&2; exit 2 ;;
esac
