#!/usr/bin/env bash
# Start a one-node SLURM cluster on this Debian machine (what tests/test_slurm.py runs on).
#
#   sudo scripts/start_slurm.sh          # or as root; idempotent: a running cluster is kept
#   sudo scripts/start_slurm.sh --stop   # stop the daemons this script started
#
# Installs slurm-wlm and munge with apt-get when missing, writes /etc/slurm/slurm.conf for this
# host (only when there is none, or it is one this script wrote), and starts munged, slurmctld
# and slurmd. No cgroup plugin (proctrack/linuxproc, task/none), so it runs in a container.
# Exits 0 once `sinfo` shows the node idle; otherwise non-zero with one line saying why.
set -uo pipefail

MARK="# written by tilefuse scripts/start_slurm.sh"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
PIDS=/run/slurm

fail() { echo "start_slurm.sh: $*" >&2; exit 1; }

stop() {
    for name in slurmd slurmctld; do
        [ -f "$PIDS/$name.pid" ] && kill "$(cat "$PIDS/$name.pid")" 2>/dev/null
    done
    [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null
    rm -f "$PIDS"/*.pid
    exit 0
}
[ "${1:-}" = "--stop" ] && stop

if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    fail "$CONF exists and was not written by this script; not touching a real cluster's setup"
fi
node_up() {
    timeout 5 sinfo -h -N -o "%t" 2>/dev/null | grep -qE '^(idle|mix|alloc)'
}
if command -v sinfo >/dev/null && [ -f "$CONF" ] && node_up; then
    echo "start_slurm.sh: SLURM is already up ($(sinfo -h -N -o '%N %t' | head -1))"
    exit 0
fi
[ "$(id -u)" = 0 ] || fail "must run as root (it installs packages and starts daemons)"

# --- packages -------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || fail "slurm-wlm and munge are missing and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/tmp/start_slurm.apt.log 2>&1 \
        || { apt-get update -q >>/tmp/start_slurm.apt.log 2>&1 \
             && apt-get install -y -q --no-install-recommends slurm-wlm munge \
                >>/tmp/start_slurm.apt.log 2>&1; } \
        || fail "apt-get install slurm-wlm munge failed (see /tmp/start_slurm.apt.log)"
fi

# --- configuration --------------------------------------------------------------------------
host=$(hostname -s)
cpus=$(nproc --all)
mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS" "$PIDS"
cat >"$CONF.new" <<EOF
$MARK
ClusterName=tilefuse
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SchedulerParameters=sched_interval=1
KillWait=5
MinJobAge=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
mv "$CONF.new" "$CONF"

# --- daemons --------------------------------------------------------------------------------
if ! pgrep -x munged >/dev/null; then
    [ -s /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged >/dev/null 2>&1 || fail "munged did not start (see /var/log/munge)"
fi
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null 2>&1 || fail "munge does not authenticate"

if ! pgrep -x slurmctld >/dev/null; then
    slurmctld -c >>"$LOGS/slurmctld.start.log" 2>&1 \
        || fail "slurmctld did not start (see $LOGS/slurmctld.log)"
fi
if ! pgrep -x slurmd >/dev/null; then
    slurmd >>"$LOGS/slurmd.start.log" 2>&1 || fail "slurmd did not start (see $LOGS/slurmd.log)"
fi

for _ in $(seq 100); do
    node_up && break
    state=$(sinfo -h -N -o "%t" 2>/dev/null | head -1)
    case "$state" in
        down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 ;;
    esac
    sleep 0.3
done
node_up || fail "the node did not come up: $(sinfo -h -N -o '%N %t %E' 2>&1 | head -1)" \
    "(see $LOGS/slurmctld.log and $LOGS/slurmd.log)"
echo "start_slurm.sh: SLURM is up: node $host, $cpus CPUs, ${mem_mb} MB, partition debug"
