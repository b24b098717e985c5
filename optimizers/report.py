"""Facts about checkpoints for reports and metrics."""

from __future__ import annotations

from pathlib import Path


def size_on_disk(folder: Path) -> int:
    """Bytes of all files below `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
