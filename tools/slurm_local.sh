#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests of `tools/ablate.py --launcher slurm`
# and for trying the launcher before a real cluster. Needs root (the daemons run as root here)
# and Debian's packages (installed with apt-get when missing).
#
#   bash tools/slurm_local.sh start    # install, configure and start; idempotent (about a minute)
#   bash tools/slurm_local.sh status   # exit 0 when the node takes jobs
#   bash tools/slurm_local.sh stop     # stop the daemons this script started
#
# Exit status: 0 ready (start, status) or stopped; 1 an error (message on stderr; the daemons'
# logs are under /var/log/slurm/); 3 the cluster cannot start on this machine (not root, no
# apt-get, or another cluster's /etc/slurm/slurm.conf): the tests skip with this script's reason.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by ssd_da tools/slurm_local.sh"
LOGS=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
READY_TIMEOUT_S=${SLURM_LOCAL_TIMEOUT_S:-180}

cannot() { echo "slurm_local.sh: cannot start: $*" >&2; exit 3; }
die() { echo "slurm_local.sh: $*" >&2; exit 1; }
# alive PIDFILE NAME: the pid file names a running process called NAME (a stale file's pid may
# belong to another process by now).
alive() { [[ -s "$1" ]] && [[ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" == "$2" ]]; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null && return 0
    command -v apt-get >/dev/null || cannot "slurmctld/slurmd/munge are not installed and there is no apt-get"
    echo "slurm_local.sh: installing slurmctld slurmd slurm-client munge (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || die "apt-get install slurmctld slurmd slurm-client munge failed"
}

write_config() {
    if [[ -f "$CONF" ]] && ! grep -qF "$MARK" "$CONF"; then
        cannot "$CONF exists and was not written by this script (a real cluster's?); left alone"
    fi
    local node host
    host=$(hostname -s)
    # slurmd -C prints this machine's NodeName=... CPUs=... RealMemory=... line.
    node=$(slurmd -C | head -n 1)
    [[ "$node" == NodeName=* ]] || die "slurmd -C printed no node line: $node"
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGS"
    cat > "$CONF.tmp" <<EOF
$MARK: one node, daemons as root
ClusterName=ssdda
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# No cgroups in this kind of sandbox: track processes by parent id, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# No slurmdbd: no accounting (sacct fails; submitit and ablate.py read squeue instead).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Jobs requeued by pre-emption or by themselves start again (ablate.py resumes them); a
# requeued job waits cred_expire seconds (default 120) before it may start, a killed step gets
# KillWait seconds (default 30) between SIGTERM and SIGKILL: shorter here, for quick tests.
JobRequeue=1
AuthInfo=cred_expire=15
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=60
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f "$CONF" ]] && cmp -s "$CONF.tmp" "$CONF"; then
        rm "$CONF.tmp"
        return 0
    fi
    mv "$CONF.tmp" "$CONF"
    # A running cluster reads the new file now (started daemons read it when they start).
    if alive "$CTLD_PID" slurmctld; then scontrol reconfigure || die "scontrol reconfigure failed"; fi
}

start_munge() {
    alive "$MUNGE_PID" munged && return 0
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then  # the package makes one; make it if it did not
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/)"
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -n 1; }

wait_ready() {
    local start=$SECONDS state=""
    while (( SECONDS - start < READY_TIMEOUT_S )); do
        state=$(node_state)
        case "$state" in
            idle*|mixed*|allocated*|completing*) return 0 ;;
            down*|drain*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    die "the node is not ready after ${READY_TIMEOUT_S}s (state '${state:-no answer}'); see $LOGS/"
}

start() {
    [[ $(id -u) -eq 0 ]] || cannot "needs root (the daemons run as root here); try sudo"
    install_packages
    write_config
    start_munge
    munge -n | unmunge >/dev/null 2>&1 || die "munge does not work (munge -n | unmunge failed)"
    alive "$CTLD_PID" slurmctld || slurmctld || die "slurmctld did not start; see $LOGS/slurmctld.log"
    alive "$SLURMD_PID" slurmd || slurmd || die "slurmd did not start; see $LOGS/slurmd.log"
    wait_ready
    echo "slurm_local.sh: one-node cluster ready ($(sinfo -h -o '%P %D node(s) %c CPUs' | head -n 1))"
}

stop() {
    if alive "$SLURMD_PID" slurmd; then kill "$(cat "$SLURMD_PID")"; fi
    if alive "$CTLD_PID" slurmctld; then kill "$(cat "$CTLD_PID")"; fi
    if alive "$MUNGE_PID" munged; then kill "$(cat "$MUNGE_PID")"; fi
    echo "slurm_local.sh: stopped"
}

status() {
    command -v sinfo >/dev/null || die "SLURM is not installed (run: bash tools/slurm_local.sh start)"
    alive "$CTLD_PID" slurmctld && alive "$SLURMD_PID" slurmd || die "slurmctld/slurmd not running"
    case "$(node_state)" in
        idle*|mixed*|allocated*|completing*) echo "slurm_local.sh: ready"; return 0 ;;
        *) die "node state '$(node_state)'" ;;
    esac
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: bash tools/slurm_local.sh {start|status|stop}" >&2; exit 2 ;;
esac
