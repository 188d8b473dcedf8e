#!/usr/bin/env bash
# Find or start a one-node SLURM cluster on localhost, for tests/test_slurm.py and CI.
#
#   tests/slurm/start_cluster.sh STATE_DIR     # prints "running" or "started"; exit 0 when usable
#   tests/slurm/stop_cluster.sh STATE_DIR      # stops only what this script started
#
# A cluster that already answers (`sinfo` lists an idle node) is used as it is. Else,
# as root with Debian's slurm-wlm and munge installed (apt-get install slurm-wlm munge),
# it writes a munge key and /etc/slurm/slurm.conf (only if absent, or one written here
# before), starts munged, slurmctld and slurmd, and records their pids in STATE_DIR.
# Exit status 3 with a one-line reason on stdout when SLURM cannot be had.
set -uo pipefail
state=${1:?usage: start_cluster.sh STATE_DIR}
mkdir -p "$state"
marker="# written by drizzlestack tests/slurm/start_cluster.sh"

idle() { sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix)'; }
if command -v sinfo >/dev/null && idle; then echo "running"; exit 0; fi

[ "$(id -u)" = 0 ] || { echo "not root: cannot start a SLURM cluster (and none is running)"; exit 3; }
for cmd in munged slurmctld slurmd sinfo sbatch; do
    command -v "$cmd" >/dev/null || { echo "$cmd not found: apt-get install slurm-wlm munge"; exit 3; }
done
conf=/etc/slurm/slurm.conf
if [ -e "$conf" ] && ! grep -qF "$marker" "$conf"; then
    echo "$conf exists and was not written by these tests: not touching it (and its cluster does not answer)"
    exit 3
fi

# munge: a key owned by munge, mode 400; munged refuses to run as root without --force.
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null
if ! munge -n </dev/null >/dev/null 2>&1; then
    munged --force || { echo "munged did not start"; exit 3; }
    pgrep -n -x munged > "$state/munged.pid"
fi

# The machine's processors: plain `nproc` follows OMP_NUM_THREADS, which a test run
# may have set to 1 (a one-CPU node then leaves the second job pending).
cpus=$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc --all)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > "$conf" <<CONF
$marker
ClusterName=drizzlestack-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Jobs cancelled by the tests end at once.
KillWait=2
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
cp "$conf" "$state/slurm.conf"
touch "$state/started-by-us"

slurmctld -c -i >/dev/null 2>&1 || slurmctld >/dev/null 2>&1 || { echo "slurmctld did not start ($state/slurmctld.log)"; exit 3; }
slurmd -N localhost >/dev/null 2>&1 || { echo "slurmd did not start ($state/slurmd.log)"; exit 3; }
for _ in $(seq 1 60); do
    if idle; then echo "started"; exit 0; fi
    scontrol update nodename=localhost state=resume >/dev/null 2>&1
    sleep 0.5
done
echo "the SLURM node did not become idle within 30 s (see $state/slurmctld.log, $state/slurmd.log)"
exit 3
