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
tampered, half-deleted) is logged and rebuilt under the build lock: removed first, or, while a
running engine holds it (`hold`), set aside as `.corrupt-<key>-*` until its holders are gone. Files
are hashed once per artifact and content: `<key>/slimserve-verified.json` binds the manifest's
digest to the files' size, mtime, ctime and inode at that moment; while they match, a replica's
start checks only those (a change through the file system changes ctime).

This module: digests, verification and `ArtifactCache` (lookup, get_or_build). The build lock and
the in-use holds are in `cache/locks.py`; listing, eviction, stale clean-up, `slimserve cache`
and the manifest as the cache reads it (`CacheManifest`) in `cache/upkeep.py`. Their public names
are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

from slimserve.optimizers.cache.locks import (
    IN_USE, MANIFEST, VERIFIED, BuildLock, CacheHold, LockTimeout, _in_use, _touch, describe_holder, hold, read_holder,
)
from slimserve.optimizers.cache.upkeep import GIB, CacheManifest, CacheUpkeep, Entry, FileDigest, cache_command

__all__ = [
    "DEFAULT_LOCK_TIMEOUT_S", "GIB", "IN_USE", "MANIFEST",
    "sha256_file", "folder_digest", "file_digests", "CorruptArtifact", "verify", "ArtifactCache",
    "LockTimeout", "BuildLock", "read_holder", "describe_holder", "CacheHold", "hold",
    "Entry", "cache_command", "CacheManifest", "FileDigest",
]

log = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT_S = 7200.0  # how long a builder waits for another one building the same key

M = TypeVar("M")


def _as_read(manifest: dict[str, Any]) -> Any:
    return manifest


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
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(VERIFIED)
        and (rel := p.relative_to(folder).as_posix()) != IN_USE
    )


def _stats(folder: Path, rels) -> dict[str, list[int]]:
    out = {}
    for rel in rels:
        st = (folder / rel).stat()
        out[rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def _verified_before(folder: Path, manifest_digest: str, expected: dict[str, FileDigest]) -> bool:
    """Whether the marker says these very files were hashed against this very manifest."""
    try:
        marker = json.loads((folder / VERIFIED).read_text())
        return (marker.get("manifest_sha256") == manifest_digest and set(_relative_files(folder)) == set(expected)
                and marker.get("files") == _stats(folder, expected))
    except (OSError, ValueError):
        return False


def _mark_verified(folder: Path, manifest_digest: str, rels) -> None:
    tmp = folder / f"{VERIFIED}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps({"manifest_sha256": manifest_digest, "files": _stats(folder, rels)}))
        os.replace(tmp, folder / VERIFIED)
    except OSError as e:  # a read-only cache: verified again next time
        log.debug("cannot record the verification of %s: %s", folder, e)


class CorruptArtifact(Exception):
    pass


def _one_line(e: Exception) -> str:
    """pydantic's ValidationError (a ValueError) as `field.path: reason; ...`; others as they print."""
    if hasattr(e, "errors"):
        return "; ".join(f"{'.'.join(map(str, x['loc'])) or '(top level)'}: {x['msg']}" for x in e.errors())
    return str(e)


def verify(folder: Path) -> dict[str, Any]:
    """Return the manifest of `folder` after checking every file against it (hashing them only
    when they are not the files verified before against this manifest)."""
    try:
        raw = (folder / MANIFEST).read_bytes()
        manifest = json.loads(raw)
        expected = CacheManifest.model_validate(manifest).files
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        raise CorruptArtifact(f"{folder}: manifest missing or unreadable ({_one_line(e)})") from None
    digest = hashlib.sha256(raw).hexdigest()
    if _verified_before(folder, digest, expected):
        return manifest
    for rel, want in expected.items():
        p = folder / rel
        if not p.is_file():
            raise CorruptArtifact(f"{folder}: {rel} is missing")
        if p.stat().st_size != want.size:
            raise CorruptArtifact(f"{folder}: {rel} has {p.stat().st_size} bytes, manifest says {want.size}")
        if sha256_file(p) != want.sha256:
            raise CorruptArtifact(f"{folder}: {rel} does not match its sha256")
    extra = set(_relative_files(folder)) - set(expected)
    if extra:
        raise CorruptArtifact(f"{folder}: files not in the manifest: {sorted(extra)}")
    _mark_verified(folder, digest, expected)
    return manifest


class ArtifactCache(CacheUpkeep):
    """`ArtifactCache(root, max_bytes=None, clean=True)` (the constructor is CacheUpkeep's).
    `max_bytes`: after each build, least recently used artifacts that no one holds are evicted
    until the cache fits (None: unbounded). Opening the cache removes stale temporaries."""

    def path(self, key: str) -> Path:
        if not key.isalnum():  # keys are hex digests; anything else could escape the root
            raise ValueError(f"invalid cache key {key!r}")
        return self.root / key

    def lookup(self, key: str, read: Callable[[dict[str, Any]], M] = _as_read) -> M | None:
        """The verified manifest of a cached artifact as `read` makes it (e.g. a pydantic model's
        model_validate), or None (missing, corrupt, or a manifest `read` refuses: one an older
        slimserve wrote; left where it is: get_or_build replaces it under the build lock)."""
        folder = self.path(key)
        if not folder.exists():
            return None
        try:
            manifest = verify(folder)
        except CorruptArtifact as e:
            log.warning("corrupt cached artifact, to be rebuilt: %s", e)
            return None
        try:
            return read(manifest)
        except ValueError as e:
            log.warning("cached artifact %s has a manifest this slimserve does not read (%s): to be rebuilt", folder,
                        _one_line(e))
            return None

    def _set_aside(self, folder: Path) -> None:
        """Out of the way of a rebuild (called under the key's build lock): removed, unless an
        engine holds it (it was verified when that engine started); then renamed to
        `.corrupt-<key>-*` for clean_stale to remove once nobody holds it."""
        if not folder.exists() or self._evict(folder):
            return
        aside = folder.with_name(f".corrupt-{folder.name}-{uuid.uuid4().hex[:8]}")
        os.rename(folder, aside)
        log.error("corrupt cached artifact %s is in use by a running engine: kept as %s until it is released",
                  folder.name, aside.name)

    def get_or_build(
        self, key: str, build: Callable[[Path], dict[str, Any]], info: dict[str, Any],
        lock_timeout_s: float | None = DEFAULT_LOCK_TIMEOUT_S, read: Callable[[dict[str, Any]], M] = _as_read,
    ) -> tuple[Path, M, bool]:
        """Return (folder, manifest, hit), the manifest as `read` makes it (lookup). `build(tmp)`
        writes the artifact into `tmp` and returns facts for the manifest (JSON-able); it runs at
        most once per key across all processes sharing `root`. Waiting for another process
        building the same key ends after `lock_timeout_s` with LockTimeout (None: no limit)."""
        manifest = self.lookup(key, read)
        if manifest is not None:
            _touch(self.path(key))
            return self.path(key), manifest, True
        self.root.mkdir(parents=True, exist_ok=True)
        lock = BuildLock(self.root / f"{key}.lock")
        lock.acquire(lock_timeout_s, {"key": key, "method": info.get("method"), "base": info.get("base")})
        try:
            manifest = self.lookup(key, read)  # another builder may have finished while we waited
            if manifest is not None:
                _touch(self.path(key))
                return self.path(key), manifest, True
            self._set_aside(self.path(key))  # corrupt (or half there): never served, rebuilt below
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.root))
            try:
                t0 = time.monotonic()
                facts = build(tmp)
                files = file_digests(tmp)
                manifest = {
                    **info,
                    "key": key,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "build_seconds": round(time.monotonic() - t0, 3),
                    "report": facts,
                    "files": files,
                }
                text = json.dumps(manifest, indent=2, sort_keys=True)
                made = read(json.loads(text))  # what the next lookup reads: a manifest it refuses is not stored
                (tmp / MANIFEST).write_text(text)
                # Just hashed: the first start that uses it need not hash it again.
                _mark_verified(tmp, hashlib.sha256((tmp / MANIFEST).read_bytes()).hexdigest(), files)
                (tmp / IN_USE).touch()
                tmp.chmod(0o755)
                final = self.path(key)
                os.rename(tmp, final)  # atomic: readers see nothing or the whole artifact
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            lock.release()
        if self.max_bytes is not None:
            self.prune(self.max_bytes, protect={key})
        return final, made, False
