#!/usr/bin/env bash
# Stop the SLURM daemons that tests/slurm/start_cluster.sh STATE_DIR started (by their
# recorded pids; nothing else), and cancel the jobs left over by the tests.
set -uo pipefail
state=${1:?usage: stop_cluster.sh STATE_DIR}
[ -e "$state/started-by-us" ] || exit 0
scancel --user="$(id -un)" >/dev/null 2>&1
for name in slurmd slurmctld munged; do
    if [ -s "$state/$name.pid" ]; then
        kill "$(cat "$state/$name.pid")" 2>/dev/null
        rm -f "$state/$name.pid"
    fi
done
rm -f "$state/started-by-us"
