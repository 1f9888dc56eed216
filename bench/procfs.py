"""What Linux says about a server process and its data directory: memory from
/proc/PID/status, forked children from /proc/*/stat, its threads' time on a CPU and waiting
for one from /proc/PID/task/*/schedstat, and a directory's bytes on disk."""

from __future__ import annotations

import os
from pathlib import Path

STATUS_FIELDS = ("RssAnon", "VmRSS", "VmHWM")


def memory_bytes(pid: int) -> dict[str, int] | None:
    """RssAnon (anonymous resident memory), VmRSS and VmHWM (peak resident) in bytes, or None
    when the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    found = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in STATUS_FIELDS:
            found[name] = int(value.split()[0]) * 1024  # the kernel prints kB
    return found


def child_pids(pid: int) -> list[int]:
    """The live children of a process (e.g. the snapshot children quotad forks)."""
    children = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def threads_schedstat_ns(pid: int) -> dict[int, tuple[int, int]] | None:
    """Each thread's (on a CPU, runnable and waiting for a CPU) nanoseconds so far, by thread
    id (the main thread's id is the pid), or None when the process is gone or the kernel
    keeps no such figures. A thread waiting for a CPU is ready to run while others hold every
    core: on shared cores, what the server loses to its neighbours."""
    try:
        entries = list(os.scandir(f"/proc/{pid}/task"))
    except OSError:
        return None
    found = {}
    for entry in entries:
        try:
            on_cpu_ns, waiting_ns, _ = Path(entry.path, "schedstat").read_text().split()
        except (OSError, ValueError):  # a thread ended meanwhile, or no schedstat
            continue
        found[int(entry.name)] = (int(on_cpu_ns), int(waiting_ns))
    return found or None


def directory_bytes(path: Path) -> tuple[int, int]:
    """(apparent, allocated) bytes of every file under path: the sum of sizes, and of blocks
    held on disk (st_blocks * 512, what du counts; less than apparent for sparse files)."""
    apparent = allocated = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:  # removed while we walked (an old snapshot, a temp file)
                continue
            apparent += info.st_size
            allocated += info.st_blocks * 512
    return apparent, allocated
