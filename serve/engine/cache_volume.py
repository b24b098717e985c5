"""Whether every node sees the same artifact cache. With `cache_volume: shared` (the default) the
cache folder must be one volume on every node (a ReadWriteMany PVC under Kubernetes): builds
coordinate through lock files in it, so one node builds an artifact and the others load it. A
folder that is only node-local there would make every node build on its own while believing it
shares, so `build_app` leaves a marker with a token in the folder and each engine replica checks
it sees the same token before any build. `cache_volume: node_local` says each node has a cache
of its own: each node then builds (once) what its engines need, and nothing is checked."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

log = logging.getLogger("slimserve.cache")

MARKER = ".slimserve-volume"


class CacheVolumeError(RuntimeError):
    """The cache folder this node sees is not the one build_app wrote its marker in."""


def volume_token(cache_dir: str, mode: str = "shared") -> str | None:
    """The shared cache's token, written once into the folder (kept across restarts); None for a
    node_local cache, or when the process building the app cannot write there (then nothing can
    be checked: logged)."""
    if mode == "node_local":
        return None
    marker = Path(cache_dir) / MARKER
    try:
        return marker.read_text().strip()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("slimserve: cannot read %s (%s): the shared-cache check is off", marker, e)
        return None
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        tmp = marker.with_name(f"{MARKER}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(token)
        try:
            os.link(tmp, marker)  # first writer wins; a concurrent one reads the winner's token
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return marker.read_text().strip()
    except OSError as e:
        log.warning("slimserve: cannot write %s (%s): the shared-cache check is off", marker, e)
        return None


def check_volume(cache_dir: str, token: str | None, who: str) -> None:
    """In an engine replica, before any build: the folder holds build_app's token."""
    if token is None:
        return
    marker = Path(cache_dir) / MARKER
    try:
        seen = marker.read_text().strip()
    except OSError:
        seen = None
    if seen != token:
        raise CacheVolumeError(
            f"{who}: the artifact cache {cache_dir} on node {socket.gethostname()} is not the volume the app was "
            f"built with ({MARKER} {'missing' if seen is None else 'holds another token'}): with cache_volume: "
            f"shared every Ray node must mount the same ReadWriteMany volume at {cache_dir}; or set "
            f"cache_volume: node_local to let each node build into a cache of its own"
        )
