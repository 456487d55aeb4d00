"""When a process started, from Linux's /proc: with its pid it names one process, not a later one
that reuses the pid, and a launcher's start time names the launch."""
import os


def process_start(pid: int):
    """The start time of process `pid` in clock ticks since boot (None if it is gone or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # after the command, which may hold ")"
    except (OSError, ValueError, IndexError):
        return None


def process_started_at(pid: int):
    """The start time of process `pid` in seconds since the epoch (None if unknown)."""
    ticks = process_start(pid)
    if ticks is None:
        return None
    try:
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")
