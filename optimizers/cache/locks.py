"""The artifact cache's locks: one builder per key, and holds on served artifacts.

`BuildLock` is an exclusive flock on `<key>.lock`, so that across processes (and, through the
file system's locks, across nodes on a shared volume) only one builds a given key while the
others wait for it and then use its result; the file says who holds it. `hold` takes a shared
flock on an artifact's in-use marker for as long as a replica serves it: eviction needs that
lock exclusively, so a served artifact is never evicted.

Both are a `HeldFd` — an open file whose flock lasts until it is closed — as are the serving
side's core-slot claims (serve/engine/cpu_binding.py) and engine-start lock (start_lock.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("slimserve.optimizers.cache.store")  # the cache's logger, as before the split

MANIFEST = "slimserve-manifest.json"
IN_USE = "slimserve-in-use.lock"  # inside an artifact: shared lock while served; mtime = last use
# Inside an artifact: its files were hashed against this manifest and matched; the files' stat
# (size, mtime, ctime, inode) then, so a later start need not hash gigabytes again (cache.verify).
VERIFIED = "slimserve-verified.json"


class LockTimeout(TimeoutError):
    """Waited too long for another process building the same artifact; says who that is."""


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


class HeldFd:
    """An open file descriptor holding a flock (None: nothing held). The lock lasts until
    `release()` closes it, the `with` block ends, or the process dies (the kernel drops a flock
    with its last fd)."""

    def __init__(self, fd: int | None = None):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class BuildLock(HeldFd):
    """An exclusive flock on `<key>.lock`. The holder writes who it is into the file, and removes
    the file when it is done; a waiter that locked a file removed meanwhile starts again on the
    new one, so removing a lock file while holding it is safe."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    def try_acquire(self) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    return False
                raise
            if _same_file(fd, self.path):
                self.fd = fd
                return True
            os.close(fd)  # removed (or replaced) by its previous holder after we opened it: again

    def acquire(self, timeout_s: float | None, facts: dict[str, Any] | None = None) -> None:
        """Wait up to `timeout_s` (None: for ever), then raise LockTimeout naming the holder."""
        t0 = time.monotonic()
        delay = 0.05
        while not self.try_acquire():
            waited = time.monotonic() - t0
            if timeout_s is not None and waited >= timeout_s:
                raise LockTimeout(
                    f"gave up after {waited:.0f} s waiting for the artifact cache lock {self.path}: "
                    f"{describe_holder(read_holder(self.path))}. It is building the same artifact; a build stops "
                    "at its variant's build_timeout_s, so a holder that stays is stuck on another node or was "
                    "started with a larger build_timeout_s"
                )
            time.sleep(min(delay, max(0.0, timeout_s - waited)) if timeout_s is not None else delay)
            delay = min(delay * 2, 1.0)
        holder = {
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(facts or {}),
        }
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(holder).encode(), 0)

    def release(self, remove: bool = True) -> None:
        if self.fd is None:
            return
        try:
            if remove:
                try:
                    os.unlink(self.path)  # while still holding it: waiters move to a new file
                except FileNotFoundError:
                    pass
            else:
                os.ftruncate(self.fd, 0)
        finally:
            super().release()


def read_holder(lock_path: Path) -> dict[str, Any] | None:
    try:
        text = Path(lock_path).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "held by a process that has not said who it is (it took the lock a moment ago, or is an older slimserve)"
    age = time.time() - holder.get("started", time.time())
    what = f"building {holder['method']} of {holder.get('base')}" if holder.get("method") else "building"
    return (f"held by pid {holder.get('pid')} on host {holder.get('host')} ({what} since "
            f"{holder.get('started_utc', '?')}, {age / 60:.0f} min ago)")


class CacheHold(HeldFd):
    """A shared lock on an artifact's in-use marker: while it is held the artifact is not evicted.
    Keep it for as long as the checkpoint is served (release() or garbage collection ends it)."""

    def __init__(self, path: Path, fd: int | None):
        super().__init__(fd)
        self.path = path

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass


def _open_marker(path: Path) -> int | None:
    """An fd on the artifact's in-use marker (created if missing); None when it neither exists
    nor can be created (a read-only cache); FileNotFoundError when the artifact is gone."""
    marker = path / IN_USE
    try:
        return os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        try:
            return os.open(marker, os.O_RDONLY)
        except FileNotFoundError:
            if path.is_dir():
                return None
            raise


def hold(path: str | os.PathLike) -> CacheHold:
    """Mark the cached artifact at `path` in use (a shared flock on its in-use marker) and record
    its last use. Raises FileNotFoundError if it is not (or no longer) a cached artifact."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path} is not a cached artifact (or was just evicted)")
    fd = _open_marker(path)
    if fd is None:
        log.warning("%s: cannot create %s (read-only cache?): it is not protected from eviction", path, IN_USE)
        return CacheHold(path, None)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits out an evictor that has it exclusively (a moment)
        if not _same_file(fd, path / IN_USE):  # evicted meanwhile: the folder was renamed away
            raise FileNotFoundError(f"{path} was evicted from the cache")
    except BaseException:
        os.close(fd)
        raise
    _touch(path)
    return CacheHold(path, fd)


def _touch(path: Path) -> None:
    """Record a use of the artifact (the in-use marker's mtime), creating the marker if needed."""
    marker = path / IN_USE
    try:
        marker.touch()
    except OSError as e:
        log.debug("cannot record the last use of %s: %s", path, e)


def _in_use(path: Path) -> bool:
    marker = path / IN_USE
    try:
        fd = os.open(marker, os.O_RDWR)
    except PermissionError:
        fd = os.open(marker, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
