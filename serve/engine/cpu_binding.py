"""Which cores a vLLM CPU engine binds its threads to. Engines sharing a core slow 20-30x (an
OpenMP thread waits on a descheduled sibling), so `cpu_threads_bind: auto` gives every engine
replica cores of its own: the app hands each variant one core set per replica (`slots`), and
each replica, when it starts, claims a slot no other replica of its variant on this node holds
(a lock file in /tmp, held for the replica's life)."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from pathlib import Path

from slimserve.optimizers.cache.locks import HeldFd

log = logging.getLogger("slimserve.cpu_binding")

SLOTS_ENV = "SLIMSERVE_CPU_BIND_SLOTS"  # slots separated by ';', each a VLLM_CPU_OMP_THREADS_BIND value
LOCK_DIR = Path(os.environ.get("SLIMSERVE_CPU_SLOT_DIR", "/tmp"))


def core_binder(n_cores: int, n_ranks: int):
    """A function handing out disjoint core sets, one per engine rank: the cores are split evenly
    between all ranks (wrapping around, with a warning, when there are too few)."""
    per_rank = max(1, n_cores // max(1, n_ranks))
    if n_ranks > n_cores:
        log.warning("%d CPU engine ranks on %d cores: some share a core and will be slow", n_ranks, n_cores)
    nxt = 0

    def take() -> list[int]:
        nonlocal nxt
        cores = [(nxt + i) % n_cores for i in range(per_rank)]
        nxt = (nxt + per_rank) % n_cores
        return cores

    return take


def slots_for(take, replicas: int, tensor_parallel_size: int) -> list[str]:
    """One VLLM_CPU_OMP_THREADS_BIND value per replica: a core set per rank, ranks split by '|'."""
    return ["|".join(",".join(map(str, take())) for _ in range(tensor_parallel_size)) for _ in range(replicas)]


class SlotClaim(HeldFd):
    """A slot held by this process until `release()` or its death (no fd: shared, not held)."""

    def __init__(self, binding: str, fd: int | None):
        super().__init__(fd)
        self.binding = binding


def claim_slot(who: str, slots: list[str], wait_s: float = 60.0) -> SlotClaim:
    """The first slot no other live replica of `who` on this node holds. While every slot is
    held (a replaced replica still draining), wait up to `wait_s`, then share the first slot
    (and say so): a replica that starts slowly beats one that does not start."""
    deadline = time.monotonic() + wait_s
    while True:
        for i, binding in enumerate(slots):
            name = hashlib.sha256(f"{who}\0{i}\0{binding}".encode()).hexdigest()[:16]
            fd = os.open(LOCK_DIR / f"slimserve-cpu-slot-{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return SlotClaim(binding, fd)
        if time.monotonic() >= deadline:
            log.warning("%s: all %d core slots are held; sharing cores %s (slow)", who, len(slots), slots[0])
            return SlotClaim(slots[0], None)
        time.sleep(1)
