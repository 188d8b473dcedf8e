"""Peak RSS of the calling process, for the benchmarks' measurement subprocesses."""

from __future__ import annotations

import resource


def peak_rss_mib() -> float:
    """This process's own peak RSS so far (``VmHWM`` from ``/proc/self/status``), in MiB.

    Not ``ru_maxrss``: Linux carries the peak of the address space a process replaces at
    ``exec`` into its ``ru_maxrss``, and Python's subprocess starts children with
    ``vfork``, whose address space is the parent's. A child's ``ru_maxrss`` is therefore at
    least its parent's peak (seen: every step of the pipeline benchmark showed the 815 MiB
    of the parent that had simulated the frames). ``ru_maxrss`` is the fallback off Linux.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
