"""Content-addressed artifact cache: atomic writes, one builder at a time, verified reads,
stale leftovers cleaned, a size cap with least-recently-used eviction.

Layout under the cache root:
    <key>/                          the optimized checkpoint, plus
    <key>/slimserve-manifest.json   sha256 and size of every file, and what made it
    <key>/slimserve-in-use.lock     a replica serving the artifact holds a shared lock on it
                                    (`hold`), so it is never evicted; its mtime is the last use
    <key>.lock                      held while <key> is being built (works across processes and,
                                    through the file system's locks, across nodes on a shared
                                    volume); it says who holds it (pid, host, since when) and is
                                    removed when the build ends
    .tmp-<key>-*                    the artifact being written; renamed to <key> when complete

An artifact is served only after every file matches its manifest; one that does not (truncated,
tampered, half-deleted) is logged, removed and rebuilt. Opening the cache removes what crashed
builders left (temporary folders and lock files no live builder holds).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

MANIFEST = "slimserve-manifest.json"
IN_USE = "slimserve-in-use.lock"  # inside an artifact: shared lock while served; mtime = last use
DEFAULT_LOCK_TIMEOUT_S = 7200.0  # how long a builder waits for another one building the same key
_STALE_MEMO_S = 3600.0  # a leftover `.base-digests.<pid>.tmp` older than this is removed
GIB = 1 << 30


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder: Path, skip: Callable[[Path], bool] = lambda rel: False, file_sha: Callable[[Path], str] = sha256_file) -> str:
    """One sha256 over (relative path, sha256) of every file below `folder` that `skip(relative path)` does not leave out."""
    h = hashlib.sha256()
    for p in sorted(x for x in folder.rglob("*") if x.is_file()):
        if not skip(rel := p.relative_to(folder)):
            h.update(f"{rel.as_posix()}\0{file_sha(p)}\n".encode())
    return h.hexdigest()


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file below `folder` (the manifest and the in-use marker excluded)."""
    return {
        rel: {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
        for rel in _relative_files(folder)
    }


def _relative_files(folder: Path) -> list[str]:
    return sorted(
        rel for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and (rel := p.relative_to(folder).as_posix()) != IN_USE
    )


class CorruptArtifact(Exception):
    pass


def verify(folder: Path) -> dict[str, Any]:
    """Return the manifest of `folder` after checking every file against it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        expected = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CorruptArtifact(f"{folder}: manifest missing or unreadable ({e})") from None
    for rel, want in expected.items():
        p = folder / rel
        if not p.is_file():
            raise CorruptArtifact(f"{folder}: {rel} is missing")
        if p.stat().st_size != want["size"]:
            raise CorruptArtifact(f"{folder}: {rel} has {p.stat().st_size} bytes, manifest says {want['size']}")
        if sha256_file(p) != want["sha256"]:
            raise CorruptArtifact(f"{folder}: {rel} does not match its sha256")
    extra = set(_relative_files(folder)) - set(expected)
    if extra:
        raise CorruptArtifact(f"{folder}: files not in the manifest: {sorted(extra)}")
    return manifest


# --- locks ----------------------------------------------------------------------------------


class LockTimeout(TimeoutError):
    """Waited too long for another process building the same artifact; says who that is."""


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


class BuildLock:
    """An exclusive flock on `<key>.lock`. The holder writes who it is into the file, and removes
    the file when it is done; a waiter that locked a file removed meanwhile starts again on the
    new one, so removing a lock file while holding it is safe."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

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
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "BuildLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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


class CacheHold:
    """A shared lock on an artifact's in-use marker: while it is held the artifact is not evicted.
    Keep it for as long as the checkpoint is served (release() or garbage collection ends it)."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "CacheHold":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

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


# --- the cache ------------------------------------------------------------------------------


@dataclass
class Entry:
    """One cached artifact, as `slimserve cache ls` shows it."""

    key: str
    path: Path
    size: int  # bytes on disk (the files' sizes)
    last_used: float  # epoch seconds: the in-use marker's mtime, else the manifest's
    in_use: bool
    manifest: dict[str, Any]


def _is_key(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _folder_size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


class ArtifactCache:
    """`max_bytes`: after each build, least recently used artifacts that no one holds are evicted
    until the cache fits (None: unbounded). Opening the cache removes stale temporaries."""

    def __init__(self, root: str | os.PathLike, max_bytes: int | None = None, clean: bool = True):
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        if clean and self.root.is_dir():
            try:
                self.clean_stale()
            except OSError as e:  # e.g. a read-only cache: serving from it still works
                log.warning("could not clean stale temporaries in %s: %s", self.root, e)

    def path(self, key: str) -> Path:
        if not key.isalnum():  # keys are hex digests; anything else could escape the root
            raise ValueError(f"invalid cache key {key!r}")
        return self.root / key

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The verified manifest of a cached artifact, or None (a corrupt one is removed)."""
        folder = self.path(key)
        if not folder.exists():
            return None
        try:
            return verify(folder)
        except CorruptArtifact as e:
            log.warning("corrupt cached artifact, rebuilding: %s", e)
            self._discard(folder)
            return None

    def get_or_build(
        self, key: str, build: Callable[[Path], dict[str, Any]], info: dict[str, Any],
        lock_timeout_s: float | None = DEFAULT_LOCK_TIMEOUT_S,
    ) -> tuple[Path, dict[str, Any], bool]:
        """Return (folder, manifest, hit). `build(tmp)` writes the artifact into `tmp` and returns
        facts for the manifest; it runs at most once per key across all processes sharing `root`.
        Waiting for another process building the same key ends after `lock_timeout_s` with
        LockTimeout (None: no limit)."""
        manifest = self.lookup(key)
        if manifest is not None:
            _touch(self.path(key))
            return self.path(key), manifest, True
        self.root.mkdir(parents=True, exist_ok=True)
        lock = BuildLock(self.root / f"{key}.lock")
        lock.acquire(lock_timeout_s, {"key": key, "method": info.get("method"), "base": info.get("base")})
        try:
            manifest = self.lookup(key)  # another builder may have finished while we waited
            if manifest is not None:
                _touch(self.path(key))
                return self.path(key), manifest, True
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.root))
            try:
                t0 = time.monotonic()
                facts = build(tmp)
                manifest = {
                    **info,
                    "key": key,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "build_seconds": round(time.monotonic() - t0, 3),
                    "report": facts,
                    "files": file_digests(tmp),
                }
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
                (tmp / IN_USE).touch()
                tmp.chmod(0o755)
                final = self.path(key)
                if final.exists():
                    self._discard(final)
                os.rename(tmp, final)  # atomic: readers see nothing or the whole artifact
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            lock.release()
        if self.max_bytes is not None:
            self.prune(self.max_bytes, protect={key})
        return final, manifest, False

    # --- listing, eviction, cleaning ---

    def entries(self) -> list[Entry]:
        """Every artifact in the cache (manifests read, not verified), oldest use first."""
        found = []
        if not self.root.is_dir():
            return found
        for folder in self.root.iterdir():
            if not (_is_key(folder.name) and folder.is_dir()):
                continue
            try:
                manifest = json.loads((folder / MANIFEST).read_text())
            except (OSError, ValueError):
                manifest = {}
            try:
                last = (folder / IN_USE).stat().st_mtime
            except OSError:
                try:
                    last = (folder / MANIFEST).stat().st_mtime
                except OSError:
                    last = 0.0
            try:
                in_use = _in_use(folder)
            except OSError:
                in_use = False
            found.append(Entry(folder.name, folder, _folder_size(folder), last, in_use, manifest))
        return sorted(found, key=lambda e: e.last_used)

    def builds(self) -> list[dict[str, Any]]:
        """Builds in progress: the holders of `<key>.lock` files that are locked now."""
        out = []
        if not self.root.is_dir():
            return out
        for lock_path in sorted(self.root.glob("*.lock")):
            lock = BuildLock(lock_path)
            if lock.try_acquire():
                lock.release()  # nobody builds: a stale lock file, removed
                continue
            out.append({"key": lock_path.stem, **(read_holder(lock_path) or {})})
        return out

    def prune(self, max_bytes: int, protect: set[str] | frozenset[str] = frozenset()) -> list[Entry]:
        """Evict least recently used artifacts, never one in use (held) nor one in `protect`,
        until the artifacts take at most `max_bytes`. Returns the evicted ones."""
        entries = self.entries()
        total = sum(e.size for e in entries)
        evicted = []
        for e in entries:
            if total <= max_bytes:
                break
            if e.key in protect or not self._evict(e.path):
                continue
            total -= e.size
            evicted.append(e)
            log.info("artifact cache: evicted %s (%s, %.1f MB, last used %s)", e.key[:12], e.manifest.get("method"),
                     e.size / 1e6, time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.last_used)))
        if total > max_bytes:
            log.warning("artifact cache %s: %.2f GiB after eviction, over its cap of %.2f GiB (the rest is in use)",
                        self.root, total / GIB, max_bytes / GIB)
        return evicted

    def _evict(self, folder: Path) -> bool:
        try:
            fd = _open_marker(folder)
        except FileNotFoundError:
            return False  # gone already
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return False  # in use
            # Renamed while holding the marker exclusively: a hold() waiting on it then finds
            # the folder gone and reports a miss.
            trash = folder.with_name(f".trash-{folder.name}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(folder, trash)
            except OSError:
                return False
        finally:
            if fd is not None:
                os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def clean_stale(self) -> list[str]:
        """Remove what crashed builders left: temporary folders and lock files no live builder
        holds, half-removed `.trash-*` folders, old digest-memo temporaries. A temporary folder
        is left alone while the lock of its key is held (its builder is alive). Returns the names removed."""
        removed: list[str] = []
        names = sorted(os.listdir(self.root))
        locks = {n[: -len(".lock")] for n in names if n.endswith(".lock") and _is_key(n[: -len(".lock")])}
        temps: dict[str, list[str]] = {}
        for n in names:
            if n.startswith(".tmp-"):
                temps.setdefault(n[len(".tmp-"):].split("-")[0], []).append(n)
            elif n.startswith(".trash-"):
                shutil.rmtree(self.root / n, ignore_errors=True)
                removed.append(n)
            elif n.startswith(".base-digests.") and n.endswith(".tmp"):
                try:
                    if time.time() - (self.root / n).stat().st_mtime > _STALE_MEMO_S:
                        (self.root / n).unlink()
                        removed.append(n)
                except OSError:
                    pass
        for prefix, tmps in temps.items():
            # `prefix` is the key (older versions wrote only its first 12 characters).
            held, ours = False, []
            for key in (k for k in locks if k.startswith(prefix)):
                lock = BuildLock(self.root / f"{key}.lock")
                if lock.try_acquire():
                    ours.append(lock)
                else:
                    held = True
            try:
                if not held:  # no live builder: with its lock in our hands, nobody starts one meanwhile
                    for n in tmps:
                        shutil.rmtree(self.root / n, ignore_errors=True)
                        removed.append(n)
            finally:
                for lock in ours:
                    lock.release()  # removes the lock file too
                    removed.append(lock.path.name)
                    locks.discard(lock.path.stem)
        for key in sorted(locks):  # lock files without a temporary folder
            lock = BuildLock(self.root / f"{key}.lock")
            if lock.try_acquire():
                lock.release()
                removed.append(lock.path.name)
        if removed:
            log.info("artifact cache %s: removed stale %s", self.root, ", ".join(removed))
        return removed

    def _discard(self, folder: Path) -> None:
        # Rename first so a reader never sees a half-deleted folder under the real key.
        trash = folder.with_name(f".trash-{folder.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(folder, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)


# --- `slimserve cache ls | prune` ------------------------------------------------------------


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def cache_command(action: str, root: str | os.PathLike, max_gib: float | None = None, out=None) -> int:
    """`ls`: every artifact (key, method, base, size, last use, in use) and builds in progress.
    `prune`: remove stale temporaries, then evict least recently used artifacts not in use until
    the cache takes at most `max_gib` GiB (None: only the clean-up)."""
    import sys

    out = out or sys.stdout
    cache = ArtifactCache(root, clean=action == "prune")
    if not cache.root.is_dir():
        print(f"no artifact cache at {cache.root}", file=out)
        return 0
    if action == "prune":
        if max_gib is None:
            print("no size cap given (--max-gib, or cache_max_gib in the config): only stale temporaries removed", file=out)
        else:
            for e in cache.prune(int(max_gib * GIB)):
                print(f"evicted {e.key[:12]}  {e.manifest.get('method', '?')}  {e.size / 1e6:.1f} MB  last used {_when(e.last_used)}", file=out)
    entries = cache.entries()
    rows = [("key", "method", "base", "MB", "last used", "in use", "slimserve")]
    for e in reversed(entries):  # most recently used first
        m = e.manifest
        rows.append((e.key[:12], str(m.get("method", "?")), Path(str(m.get("base", "?"))).name, f"{e.size / 1e6:.1f}",
                     _when(e.last_used), "yes" if e.in_use else "no", str((m.get("slimserve") or {}).get("version", "-"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    if entries:
        for r in rows:
            print("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip(), file=out)
    total = sum(e.size for e in entries)
    print(f"{len(entries)} artifact(s), {total / GIB:.2f} GiB in {cache.root}"
          + (f" (cap {max_gib:g} GiB)" if max_gib is not None else ""), file=out)
    for b in cache.builds():
        print(f"building {b['key'][:12]}: {describe_holder(b if 'pid' in b else None)}", file=out)
    return 0
