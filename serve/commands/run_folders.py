"""Each local run's own Ray folder, and ending what a run that died left running: a start of
`slimserve run` / `demo` must not depend on an earlier run's leftovers (ports, cores, agents)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

# Past runs' Ray folders kept (for their logs); older ones are removed when a run starts.
KEEP_RUNS = 5


def runs_root() -> Path:
    """Where local runs keep their Ray folders. Ray's sockets live inside, and a Unix socket's
    path has at most 107 bytes: the folder stays short."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base if len(base) <= 32 else "/tmp") / f"slimserve-{os.getuid()}"


def run_folder(pid: int) -> Path:
    """The Ray folder (`ray.init(_temp_dir=...)`) of the run of process `pid`: named by the pid
    and the process's start time, so that a reused pid is not taken for a live run."""
    return runs_root() / f"{pid}.{_start_digest(pid)}"


def _start_digest(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "gone"
    return hashlib.sha1(started.encode()).hexdigest()[:8]


def _run_is_live(folder: Path) -> bool:
    pid, _, digest = folder.name.partition(".")
    return pid.isdigit() and digest != "gone" and _start_digest(int(pid)) == digest


def processes_using(folders: list[Path]) -> dict[int, tuple[str, str]]:
    """Processes writing to a file under one of `folders`: pid -> (start digest, name). Every
    process of a run does: Ray sends each one's output to a log file in its folder, and vLLM's
    processes inherit their replica's. (Only writers: someone's `tail -f` of a log is not ours.)"""
    prefixes = tuple(f"{folder}/" for folder in folders)
    found: dict[int, tuple[str, str]] = {}
    if not prefixes or not os.path.isdir("/proc"):
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                if not os.readlink(f"/proc/{entry}/fd/{fd}").startswith(prefixes):
                    continue
                with open(f"/proc/{entry}/fdinfo/{fd}") as f:
                    flags = int(next(l for l in f if l.startswith("flags:")).split()[1], 8)
                if flags & os.O_ACCMODE == os.O_RDONLY:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    name = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:60]
            except (OSError, StopIteration, ValueError, IndexError):
                continue
            found[int(entry)] = (_start_digest(int(entry)), name)
            break
    return found


def clear_stale_runs() -> None:
    """End what earlier runs left running (their `slimserve` process is gone), and remove all but
    the newest KEEP_RUNS of their folders."""
    root = runs_root()
    try:
        stale = [d for d in root.iterdir() if d.is_dir() and not _run_is_live(d)]
    except OSError:
        return
    end_processes(processes_using(stale), "left by an earlier run that did not stop")
    stale.sort(key=lambda d: d.stat().st_mtime)
    for d in stale[: max(0, len(stale) - KEEP_RUNS)]:
        shutil.rmtree(d, ignore_errors=True)


def end_processes(procs: dict[int, tuple[str, str]], why: str, wait_s: float = 0) -> None:
    """Wait up to `wait_s` for `procs` to exit on their own, then SIGTERM, then SIGKILL."""
    def running(procs):
        return {pid: t for pid, t in procs.items() if _running(pid, t[0])}

    deadline = time.monotonic() + wait_s
    while procs and time.monotonic() < deadline:
        time.sleep(0.5)
        procs = running(procs)
    if not procs:
        return
    print(f"slimserve: ending {len(procs)} process(es) {why}: " + ", ".join(f"{pid} {t[1]}" for pid, t in sorted(procs.items())),
          file=sys.stderr, flush=True)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in procs:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while procs and time.monotonic() < deadline:
            time.sleep(0.2)
            procs = running(procs)
        if not procs:
            return


def _running(pid: int, digest: str) -> bool:
    """`pid` is still the process we saw (not gone, not a zombie, not a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        return False
    return _start_digest(pid) == digest
