"""Facts about checkpoints for reports and metrics."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def size_on_disk(folder: Path) -> int:
    """Bytes of all files below `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def weight_bytes(folder: Path) -> int:
    """Bytes of all tensors in the folder's safetensors files as stored (packed for quantized
    layers), read from their headers: 8 bytes of header length, then a JSON table of data offsets."""
    total = 0
    for path in Path(folder).glob("*.safetensors"):
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        total += sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")
    return total
