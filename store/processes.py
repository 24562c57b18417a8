"""Which process a run's row names: its pid and that process's start time (Linux /proc).

A pid alone does not name a process for long: once the training process ends, the kernel may give
the same number to any other process. The start time does not change while a process lives, so the
pair (pid, start time) recorded with a run names its process and no other. Both the trainer (when
`stepscope train` creates its run) and the server's job runner (when it starts a job) record it.
"""

from __future__ import annotations

from pathlib import Path


def process_start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (field 22 of /proc/PID/stat); None if unreadable.

    None (no such process, no /proc, a format we do not know) never matches a recorded start time, so
    a process we cannot identify is never taken for a run's own.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may itself hold spaces or ')': split after the last.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])  # fields[0] is field 3 (the state), so field 22 is fields[19]
    except (IndexError, ValueError):
        return None
