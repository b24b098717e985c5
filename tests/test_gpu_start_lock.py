"""The engine-start lock is per GPU (serve/engine/start_lock.py): engines on different GPUs start
together, engines sharing a GPU one at a time, and an engine whose GPUs cannot be known waits for
all. On a real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`); the GPUs are
Ray's resource counts without devices behind them (this machine has none), which is all the lock
reads: Ray binds a placement group's GPU share to GPU ids when it reserves the group. The
"replicas" are actors placed the way Ray Serve places an engine replica (bundle 0 of its group,
capturing child tasks), running the lock's real code."""

from __future__ import annotations

import uuid

import pytest

from conftest import RUN_MARKER_ENV, leftovers_after

pytestmark = pytest.mark.heavy


def replica_class():
    import ray

    from slimserve.serve.engine.start_lock import EngineStartLock, engine_gpus

    @ray.remote(num_cpus=0)
    class Replica:
        """What the on-load hook does right before the engine starts (onload.on_after_node_init)."""

        def __init__(self, lock_path: str):
            self.lock = EngineStartLock("test", lock_path)

        async def gpus(self):
            return await engine_gpus()

        async def start(self) -> float:
            timings: dict[str, float] = {}
            await self.lock.acquire(timings, await engine_gpus())
            return timings["start_lock_wait_seconds"]

        def started(self) -> None:
            self.lock.release()

    return Replica


def test_engines_on_other_gpus_start_together_and_engines_sharing_one_wait(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    monkeypatch.setenv(RUN_MARKER_ENV, uuid.uuid4().hex)
    ray.shutdown()  # an earlier test's local instance, if any: this test's driver joins its own cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 2, "resources": {"head": 1},
                                                               "include_dashboard": False})
    cluster.add_node(num_cpus=1, num_gpus=1, resources={"worker": 1})
    lock = tmp_path / "engine-start.lock"
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        head = ray.get_runtime_context().get_node_id()
        Replica = replica_class()

        def replica_in(bundles, strategy="PACK"):
            pg = placement_group(bundles, strategy=strategy)
            ray.get(pg.ready(), timeout=60)
            return pg, Replica.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote(str(lock))

        # Two engines of one GPU each on the head: two GPUs, started together.
        (pg_a, a), (pg_b, b) = replica_in([{"GPU": 1, "head": 0.01}]), replica_in([{"GPU": 1, "head": 0.01}])
        gpus_a, gpus_b = ray.get([a.gpus.remote(), b.gpus.remote()], timeout=60)
        assert [g.node_id for g in gpus_a + gpus_b] == [head, head]
        assert {g.gpu_id for g in gpus_a + gpus_b} == {"0", "1"}, (gpus_a, gpus_b)
        waits = ray.get([a.start.remote(), b.start.remote()], timeout=60)  # both hold their GPU's lock now
        assert max(waits) < 1.0, waits
        ray.get([a.started.remote(), b.started.remote()])
        for pg in (pg_a, pg_b):
            remove_placement_group(pg)

        # A tensor-parallel engine over both of the head's GPUs holds both.
        pg_tp, tp = replica_in([{"GPU": 1, "head": 0.01}, {"GPU": 1, "head": 0.01}])
        assert sorted(g.gpu_id for g in ray.get(tp.gpus.remote(), timeout=60)) == ["0", "1"]

        # Two engines sharing the worker's one GPU (half each): one at a time.
        (_, c), (_, d) = (replica_in([{"GPU": 0.5, "worker": 0.01}]) for _ in range(2))
        gpus_c, gpus_d = ray.get([c.gpus.remote(), d.gpus.remote()], timeout=60)
        assert gpus_c == gpus_d and gpus_c[0].node_id != head and gpus_c[0].gpu_id == "0", (gpus_c, gpus_d)
        assert ray.get(c.start.remote(), timeout=60) < 1.0
        # The head's GPU 0 is another GPU than the worker's GPU 0: the TP engine does not wait.
        assert ray.get(tp.start.remote(), timeout=60) < 1.0
        d_started = d.start.remote()
        ready, _ = ray.wait([d_started], timeout=3)
        assert not ready, "an engine started on a GPU where another engine was starting"
        ray.get(c.started.remote())
        assert ray.get(d_started, timeout=30) >= 2.0  # it waited (its GPU query took part of the 3 s)
        ray.get(d.started.remote())

        # An engine with no placement group (its GPUs unknown) waits for every engine of the node.
        unknown = Replica.remote(str(lock))
        assert ray.get(unknown.gpus.remote(), timeout=60) is None
        unknown_started = unknown.start.remote()
        ready, _ = ray.wait([unknown_started], timeout=3)
        assert not ready, "an engine of unknown GPUs started while another engine was starting"
        ray.get(tp.started.remote())
        assert ray.get(unknown_started, timeout=30) >= 2.0
        ray.get(unknown.started.remote())
        remove_placement_group(pg_tp)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert leftovers_after(r"raylet|gcs_server|ray::", 60) == {}
