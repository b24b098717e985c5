"""The ingress's view of its variants (serve/http/health.py) at the moment a deploy finishes.

The race found on a busy host: a look at Serve's status that began while the engine was still
starting came back after the app was RUNNING, and the first request, which shared that look, got
a 503 "loading". Timing that race against a real controller cannot be made deterministic, so
Serve's status here is a stand-in object with the fields HealthBoard reads (the end-to-end path
is in test_declared_weights / test_serving)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from slimserve.serve.http.health import HealthBoard, State


class EngineHandle:
    deployment_name = "SlimServer:m--a"

    class _Info:
        @staticmethod
        async def remote():
            return {"pid": 1}

    slimserve_info = _Info()


def overview(status: str) -> SimpleNamespace:
    dep = SimpleNamespace(status=status, message="")
    return SimpleNamespace(applications={"app": SimpleNamespace(deployments={"SlimServer:m--a": dep})})


class SlowController:
    """serve.status() that answers what was true when it was asked, `delay_s` later."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.status = "UPDATING"
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.calls += 1
        seen = self.status
        time.sleep(self.delay_s)
        return overview(seen)


def test_a_request_after_the_engine_came_up_is_not_answered_from_an_older_look():
    async def scenario():
        controller = SlowController(delay_s=0.3)
        board = HealthBoard({"m--a": EngineHandle()}, "app", controller)
        board._last_refresh = -1e9
        looking = asyncio.create_task(board.refresh())  # begun while the engine starts
        await asyncio.sleep(0.05)
        controller.status = "HEALTHY"  # the engine is up; the look above still reads "UPDATING"
        await board.refresh_if_stale(["m--a"])  # the first request
        await looking
        return board.state_of("m--a"), controller.calls

    health, calls = asyncio.run(scenario())
    assert health.state is State.READY, health.describe()
    assert calls >= 2


def test_a_variant_that_is_down_stays_down_and_looks_are_bounded():
    async def scenario():
        controller = SlowController(delay_s=0.01)
        board = HealthBoard({"m--a": EngineHandle()}, "app", controller)
        await asyncio.sleep(0.1)  # the board's warm-up call
        before = controller.calls
        board._last_refresh = -1e9
        await asyncio.gather(*(board.refresh_if_stale(["m--a"]) for _ in range(20)))
        return board.state_of("m--a"), controller.calls - before

    health, looks = asyncio.run(scenario())
    assert health.state is State.LOADING
    assert 1 <= looks <= 2, looks  # 20 concurrent requests share the looks


def test_requests_waiting_on_a_variant_learn_when_it_goes_down_and_a_fresh_wait_once_it_is_back():
    """`went_down` is what the ingress waits on beside a request's first byte (ingress._unless_down)."""

    async def scenario():
        controller = SlowController(delay_s=0)
        controller.status = "HEALTHY"
        board = HealthBoard({"m--a": EngineHandle()}, "app", controller)
        await board.refresh()
        assert board.state_of("m--a").state is State.READY
        waiting = board.went_down("m--a")
        assert not waiting.is_set()
        board.mark_lost("m--a", RuntimeError("node died"))
        assert waiting.is_set() and board.went_down("m--a").is_set()  # a request routed now learns at once
        await asyncio.sleep(0.01)
        await board.refresh()  # asked after the loss: an engine answers again
        assert board.state_of("m--a").state is State.READY
        assert not board.went_down("m--a").is_set()

    asyncio.run(scenario())


class ReplicaController:
    """serve.status() with the replica counts Serve reports per state."""

    def __init__(self):
        self.replicas: dict = {}

    def __call__(self):
        dep = SimpleNamespace(status="HEALTHY", message="", replica_states=dict(self.replicas))
        return SimpleNamespace(applications={"app": SimpleNamespace(deployments={"SlimServer:m--a": dep})})


def test_a_variant_whose_running_replica_went_is_down_until_one_runs_again_but_waking_from_zero_is_not():
    """Serve noticed the loss before any request did: it reports the deployment healthy with a
    replica starting and none running. Requests sent then would wait for that replica."""

    async def scenario():
        controller = ReplicaController()
        board = HealthBoard({"m--a": EngineHandle()}, "app", controller)

        async def state_after(replicas: dict) -> State:
            controller.replicas = replicas
            await board.refresh()
            return board.state_of("m--a").state

        assert await state_after({"RUNNING": 1}) is State.READY
        waiting = board.went_down("m--a")
        assert await state_after({"STARTING": 1}) is State.UNHEALTHY and waiting.is_set()
        assert "Serve is starting another" in board.state_of("m--a").describe()
        assert await state_after({"STARTING": 1}) is State.UNHEALTHY  # until one runs
        assert await state_after({"RUNNING": 1}) is State.READY
        assert not board.went_down("m--a").is_set()
        # Scaled to zero, then a request wakes it: it waits for the replica it started.
        assert await state_after({}) is State.IDLE
        assert await state_after({"STARTING": 1}) is State.READY
        # Scaling up beside a running replica is no loss either.
        assert await state_after({"RUNNING": 1, "STARTING": 1}) is State.READY

    asyncio.run(scenario())


def test_a_request_waiting_for_a_variant_that_goes_down_is_cancelled_and_the_ingress_told():
    """The ingress's wait beside a request (SlimserveIngress._unless_down, on a stand-in for the
    ingress holding a real board): the request that Serve would keep queued is cancelled."""
    import pytest

    from slimserve.serve.http.ingress import SlimserveIngress, VariantWentDown

    async def scenario():
        controller = SlowController(delay_s=0)
        controller.status = "HEALTHY"
        board = HealthBoard({"m--a": EngineHandle()}, "app", controller)
        await board.refresh()
        host, target = SimpleNamespace(_health=board), SimpleNamespace(model_id="m--a")

        async def answered():
            return "answer"
        assert await SlimserveIngress._unless_down(host, answered(), target) == "answer"

        cancelled = asyncio.Event()

        async def queued():  # in Serve's queue for a replica that is not coming
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        waiting = asyncio.create_task(SlimserveIngress._unless_down(host, queued(), target))
        await asyncio.sleep(0.05)
        board.mark_lost("m--a", RuntimeError("node died"))
        with pytest.raises(VariantWentDown, match="unhealthy: lost a replica"):
            await waiting
        assert cancelled.is_set()

    asyncio.run(scenario())
