"""Upkeep of the artifact cache: listing, size-capped least-recently-used eviction, and removal
of what crashed builders left, as `CacheUpkeep` (the base of `ArtifactCache`), plus the body of
`slimserve cache ls | prune`. An artifact held in use (`cache/locks.py`'s `hold`) is never
evicted, and a temporary folder is left alone while its key's build lock is held.

`CacheManifest` is the part of an artifact's manifest the cache itself reads (every file's
digest; the method, base and slimserve version `slimserve cache ls` shows). The build's full
manifest, `ArtifactManifest` (optimizers/build/build_report.py), extends it: this room may not
import the build's (tests/test_import_graph.py), so the cache reads its own fields only.
"""

from __future__ import annotations

import fcntl
import socket
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slimserve.optimizers.cache.locks import IN_USE, MANIFEST, BuildLock, _in_use, _open_marker, describe_holder, read_holder

log = logging.getLogger("slimserve.optimizers.cache.store")  # the cache's logger, as before the split

REMOTE_BUILD_GRACE_S = 24 * 3600.0  # longer than any build_timeout_s in use
_STALE_MEMO_S = 3600.0  # a leftover `.base-digests.<pid>.tmp` older than this is removed
GIB = 1 << 30


class FileDigest(BaseModel):
    """One file of an artifact, as its manifest records it (cache/store.py writes and verifies it)."""

    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(description="sha256 of the file's bytes, hex.")
    size: int = Field(ge=0, description="Its size in bytes.")


class CacheManifest(BaseModel):
    """`<key>/slimserve-manifest.json` as the cache reads it: every file's digest (verified
    before the artifact is served) and what `slimserve cache ls` shows. Other fields (the
    build's: `ArtifactManifest`) are ignored here. One that does not read is a corrupt artifact
    to `verify` (rebuilt) and an unknown one to `entries` (listed as `?`)."""

    model_config = ConfigDict(extra="ignore")

    files: dict[str, FileDigest] = Field(description="sha256 and size of every file of the artifact.")
    method: str | None = Field(None, description="The optimization method (registry name).")
    base: str | None = Field(None, description="The base checkpoint's folder.")
    slimserve: dict[str, Any] = Field(default_factory=dict, description="slimserve's version and code identity that built it.")


def read_manifest(text: str | bytes) -> CacheManifest:
    """The manifest in `text`; ValueError (pydantic's ValidationError is one) when it does not read.
    (json.loads, not pydantic's JSON parser: a build report's NaN perplexity is written as NaN.)"""
    return CacheManifest.model_validate(json.loads(text))


@dataclass
class Entry:
    """One cached artifact, as `slimserve cache ls` shows it."""

    key: str
    path: Path
    size: int  # bytes on disk (the files' sizes)
    last_used: float  # epoch seconds: the in-use marker's mtime, else the manifest's
    in_use: bool
    manifest: CacheManifest | None  # None: missing or unreadable

    @property
    def method(self) -> str:
        return (self.manifest and self.manifest.method) or "?"

    @property
    def base(self) -> str:
        return (self.manifest and self.manifest.base) or "?"

    @property
    def slimserve_version(self) -> str:
        version = self.manifest.slimserve.get("version") if self.manifest else None
        return "-" if version is None else str(version)


def _building_elsewhere(lock_path: Path) -> bool:
    """A build another host started less than REMOTE_BUILD_GRACE_S ago: left alone even when its
    lock looks free here, since not every shared volume carries flock between nodes (NFS without
    a lock manager, some CSI drivers). A dead remote builder's leftovers go after the grace, or
    at once when a builder here takes the key (its lock then names this host)."""
    holder = read_holder(lock_path)
    return bool(holder) and holder.get("host") != socket.gethostname() \
        and time.time() - float(holder.get("started", 0)) < REMOTE_BUILD_GRACE_S


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


class CacheUpkeep:
    """Listing, eviction and cleaning of the cache at `root`; `ArtifactCache` adds building and
    verified reads. Opening it (with `clean`) removes stale temporaries."""

    def __init__(self, root: str | os.PathLike, max_bytes: int | None = None, clean: bool = True):
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        if clean and self.root.is_dir():
            try:
                self.clean_stale()
            except OSError as e:  # e.g. a read-only cache: serving from it still works
                log.warning("could not clean stale temporaries in %s: %s", self.root, e)

    def entries(self) -> list[Entry]:
        """Every artifact in the cache (manifests read, not verified), oldest use first."""
        found = []
        if not self.root.is_dir():
            return found
        for folder in self.root.iterdir():
            if not (_is_key(folder.name) and folder.is_dir()):
                continue
            try:
                manifest = read_manifest((folder / MANIFEST).read_bytes())
            except (OSError, ValueError):
                manifest = None
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
            log.info("artifact cache: evicted %s (%s, %.1f MB, last used %s)", e.key[:12], e.method,
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
            elif n.startswith(".corrupt-") and not _in_use(self.root / n):  # set aside; its engines are gone
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
                if _building_elsewhere(lock.path):
                    held = True
                elif lock.try_acquire():
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
            if not _building_elsewhere(lock.path) and lock.try_acquire():
                lock.release()
                removed.append(lock.path.name)
        if removed:
            log.info("artifact cache %s: removed stale %s", self.root, ", ".join(removed))
        return removed


# --- `slimserve cache ls | prune` ------------------------------------------------------------


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def cache_command(action: str, root: str | os.PathLike, max_gib: float | None = None, out=None) -> int:
    """`ls`: every artifact (key, method, base, size, last use, in use) and builds in progress.
    `prune`: remove stale temporaries, then evict least recently used artifacts not in use until
    the cache takes at most `max_gib` GiB (None: only the clean-up)."""
    import sys

    out = out or sys.stdout
    cache = CacheUpkeep(root, clean=action == "prune")
    if not cache.root.is_dir():
        print(f"no artifact cache at {cache.root}", file=out)
        return 0
    if action == "prune":
        if max_gib is None:
            print("no size cap given (--max-gib, or cache_max_gib in the config): only stale temporaries removed", file=out)
        else:
            for e in cache.prune(int(max_gib * GIB)):
                print(f"evicted {e.key[:12]}  {e.method}  {e.size / 1e6:.1f} MB  last used {_when(e.last_used)}", file=out)
    entries = cache.entries()
    rows = [("key", "method", "base", "MB", "last used", "in use", "slimserve")]
    for e in reversed(entries):  # most recently used first
        rows.append((e.key[:12], e.method, Path(e.base).name, f"{e.size / 1e6:.1f}",
                     _when(e.last_used), "yes" if e.in_use else "no", e.slimserve_version))
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
