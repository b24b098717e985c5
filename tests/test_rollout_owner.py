"""The rollout's one owner (serve/rollout/owner.py): every ingress replica's evidence in one
place, and a state that resumes at the step wherever the owner restarts.

The first tests drive the owner in-process (no Ray); the GCS test starts a local Ray for its
key-value store; the last runs the app on a real two-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`), one ingress replica per node, and compares the step's evidence with
what the clients themselves counted."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid

import httpx
import openai
import pytest

from conftest import RUN_MARKER_ENV, free_port, leftovers_after, wait_for
from slimserve.serve.rollout.owner import RolloutOwner, RolloutReport
from slimserve.serve.rollout.state import RolloutState, StateStore

ROLLOUT = {"candidate": "cand", "baseline": "base", "steps": [10, 50, 100], "min_requests": 50,
           "min_seconds": 10, "evaluate_every_s": 1}


def owner(tmp_path) -> RolloutOwner:
    return RolloutOwner({"m": ROLLOUT}, str(tmp_path), app_name="app", mirror=None)  # the file only


def report(replica: str, base: int, cand: int, user_prefix: str = "u") -> RolloutReport:
    obs = [("m", "base", "200", 0.05, 0.2, f"{user_prefix}{i}") for i in range(base)]
    obs += [("m", "cand", "200", 0.05, 0.2, f"{user_prefix}{i}") for i in range(cand)]
    obs += [("other", "x", "200", 0.05, 0.2, None)]  # a model without a rollout: not counted
    return RolloutReport(replica=replica, observations=obs, probes=[("m", "cand", True)], candidate_up={"m": True})


def test_the_owner_sums_every_replicas_evidence(tmp_path):
    o = owner(tmp_path)
    asyncio.run(o.report(report("node-a:1", base=30, cand=4, user_prefix="a")))
    views = asyncio.run(o.report(report("node-b:2", base=25, cand=6, user_prefix="b")))
    evidence = views["m"].summary["evidence"]
    assert (evidence["baseline_requests"], evidence["candidate_requests"]) == (55, 10)
    assert evidence["probes"] == 2 and evidence["matches"] == 2
    assert o.received == {"m": 65}
    assert views["m"].state.status == "running" and views["m"].state.percent == 10


def test_admin_actions_go_through_the_owner_and_a_refused_one_says_why(tmp_path):
    o = owner(tmp_path)
    answer = asyncio.run(o.admin("m", "pause", "maintenance"))
    assert answer.error is None and answer.view.state.status == "paused"
    refused = asyncio.run(o.admin("m", "resume", "x"))
    assert refused.error is None
    refused = asyncio.run(o.admin("m", "resume", "again"))
    assert refused.error == "cannot resume a rollout that is running"


def test_a_new_owner_resumes_at_the_step_from_the_stored_state(tmp_path):
    first = owner(tmp_path)
    asyncio.run(first.admin("m", "pause", "looking at a dashboard"))
    again = owner(tmp_path)  # a restarted owner: fresh evidence, the stored state
    view = asyncio.run(again.views())["m"]
    assert view.state.status == "paused"
    assert [h.action for h in view.state.history] == ["start", "pause"]
    assert view.summary["evidence"]["candidate_requests"] == 0


def test_the_app_binds_one_owner_into_the_ingress_and_keeps_it_across_redeploys(tmp_path):
    from slimserve.serve.app import ROLLOUT_OWNER_DEPLOYMENT, build_app
    from slimserve.serve.rayllm import bound_deployment

    config = {"cache_dir": str(tmp_path), "models": [{"name": "m", "variants": [{"name": "base"}, {"name": "cand"}],
                                                       "rollout": {"candidate": "cand"}}]}
    owners = [bound_deployment(build_app(config)).init_kwargs["rollout_owner"] for _ in range(2)]
    assert {bound_deployment(o).name for o in owners} == {ROLLOUT_OWNER_DEPLOYMENT}
    assert bound_deployment(owners[0])._version == bound_deployment(owners[1])._version  # same args: kept
    changed = {**config, "models": [{**config["models"][0], "rollout": {"candidate": "cand", "steps": [50, 100]}}]}
    assert bound_deployment(bound_deployment(build_app(changed)).init_kwargs["rollout_owner"])._version \
        != bound_deployment(owners[0])._version
    no_rollout = {**config, "models": [{"name": "m", "variants": [{"name": "base"}]}]}
    assert "rollout_owner" not in bound_deployment(build_app(no_rollout)).init_kwargs


@pytest.mark.standalone
def test_the_gcs_copy_wins_over_an_older_or_missing_file(tmp_path):
    """Ray's GCS key-value store (rayllm.GcsKeyValue) holds the state too: an owner restarted on a
    node whose cache folder is its own (no file, or an older one) still resumes at the step."""
    import ray

    from slimserve.serve.rayllm import GcsKeyValue

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        mirror = GcsKeyValue.if_connected()
        assert mirror is not None
        node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"
        app = f"app-{uuid.uuid4().hex[:6]}"  # the store outlives this test's keys: a name of its own
        first = RolloutOwner({"m": ROLLOUT}, str(node_a), app_name=app, mirror=mirror)
        asyncio.run(first.admin("m", "pause", "held for a look"))
        stale = node_a / f"{app}--m.json"
        older = stale.read_text()
        asyncio.run(first.admin("m", "resume", "looked"))
        asyncio.run(first.admin("m", "abort", "not today"))
        # Node B: no file at all. Node A's folder: the file as it was two saves ago.
        for folder, file_text in ((node_b, None), (node_a, older)):
            if file_text is not None:
                stale.write_text(file_text)
            moved = RolloutOwner({"m": ROLLOUT}, str(folder), app_name=app, mirror=mirror)
            state = asyncio.run(moved.views())["m"].state
            assert state.status == "aborted" and [h.action for h in state.history][-1] == "abort"
        # Without the GCS copy the stale file is all there is (what node-local folders alone would give).
        alone = StateStore(node_a, app, "m").load()
        assert isinstance(alone, RolloutState) and alone.status == "paused"
    finally:
        ray.shutdown()


APP = "fleet"
LEFTOVER = r"raylet|gcs_server|ray::|EngineCore|VLLM"


def actor_nodes(class_prefix: str) -> set[str]:
    import ray

    return {a["Address"]["NodeID"] for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"].startswith(class_prefix)}


@pytest.mark.standalone
def test_two_ingress_replicas_on_two_nodes_feed_one_owner(tmp_path, monkeypatch):
    """A/A rollout (the candidate is the same checkpoint), one ingress replica on each of two
    nodes: the step's evidence is every request the clients sent, split as the clients saw it;
    the owner killed resumes at the step, with its state in Ray's GCS store."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from slimserve.serve.app import ROLLOUT_OWNER_DEPLOYMENT, build_app

    monkeypatch.setenv(RUN_MARKER_ENV, uuid.uuid4().hex)
    monkeypatch.setenv("SLIMSERVE_ADMIN_KEYS", "admin-key")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        config = {
            # Node-local caches: no volume check, and the owner's state must not need the cache
            # folder (on one machine the two nodes' folders are one; the owner is restarted below
            # with the state file deleted, which is what another node's own cache looks like).
            "cache_dir": str(tmp_path / "artifacts"), "cache_volume": "node_local",
            "models": [{"name": "smollm2", "source": "default", "engine": {"max_model_len": 512},
                        "variants": [{"name": "base", "weight": 1}, {"name": "cand", "weight": 1}],
                        # Long minimums: the step holds while the test counts.
                        "rollout": {"candidate": "cand", "steps": [30, 100], "min_requests": 10_000,
                                    "min_seconds": 3600, "evaluate_every_s": 1}}],
            "ingress": {"replicas": 2, "max_replicas_per_node": 1, "health_probe_interval_s": 2,
                        "admin_keys_env": "SLIMSERVE_ADMIN_KEYS"},
        }
        serve.run(build_app(config), name=APP, route_prefix="/", blocking=False)
        wait_for(lambda: serve.status().applications[APP].status == "RUNNING", 420, "both variants running")
        head = ray.get_runtime_context().get_node_id()
        assert actor_nodes(f"ServeReplica:{APP}:SlimserveIngress") == {head, worker.node_id}
        assert actor_nodes(f"ServeReplica:{APP}:SlimServer") == {head, worker.node_id}
        # The two nodes started their engines side by side: their records (the admin route's
        # copy of each engine's slimserve_info) say when each start began and ended.
        def engine_spans() -> list[dict]:
            variants = httpx.get(f"{url}/slimserve/variants", headers={"authorization": "Bearer admin-key"},
                                 timeout=10).json()["variants"]
            return [(v.get("engine") or {}).get("timings", {}) for v in variants.values()]

        wait_for(lambda: all("ready_at" in s for s in engine_spans()), 60, "both engines' records at the ingress")
        spans = engine_spans()
        assert len(spans) == 2 and max(s["started_at"] for s in spans) < min(s["ready_at"] for s in spans), spans
        first, last = min(s["started_at"] for s in spans), max(s["ready_at"] for s in spans)
        print(f"\nengine starts on two nodes: {[round(s['ready_at'] - s['started_at'], 1) for s in spans]} s each, "
              f"{last - first:.1f} s for both, overlapping {min(s['ready_at'] for s in spans) - max(s['started_at'] for s in spans):.1f} s")

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        seen: collections.Counter = collections.Counter()
        for i in range(60):
            r = client.completions.with_raw_response.create(model="smollm2", prompt=f"Count {i}:", max_tokens=2,
                                                             temperature=0)
            seen[r.headers["x-slimserve-variant"]] += 1
        assert seen["base"] > 0 and seen["cand"] > 0

        admin = {"authorization": "Bearer admin-key"}

        def rollout() -> dict:
            return httpx.get(f"{url}/slimserve/rollout/smollm2", headers=admin, timeout=10).json()

        def counted() -> bool:
            ev = rollout()["evidence"]
            return ev["baseline_requests"] + ev["candidate_requests"] >= sum(seen.values())

        wait_for(counted, 30, "every replica's report reaching the owner")
        ev = rollout()["evidence"]
        assert (ev["baseline_requests"], ev["candidate_requests"]) == (seen["base"], seen["cand"])

        # The owner's replica killed: Serve starts another; the state (paused, with its history)
        # comes back from Ray's GCS store even with the cache folder's file gone.
        paused = httpx.post(f"{url}/slimserve/rollout/smollm2/pause", headers=admin, json={"reason": "a look"},
                            timeout=10)
        assert paused.status_code == 200 and paused.json()["status"] == "paused"
        for f in (tmp_path / "artifacts" / "rollouts").glob("*.json"):
            f.unlink()
        owner_actors = [a["Name"] for a in ray._private.state.actors().values() if a["State"] == "ALIVE"
                        and a["ActorClassName"] == f"ServeReplica:{APP}:{ROLLOUT_OWNER_DEPLOYMENT}"]
        assert len(owner_actors) == 1, owner_actors
        ray.kill(ray.get_actor(owner_actors[0], namespace="serve"), no_restart=True)
        time.sleep(2)

        def resumed() -> bool:
            r = httpx.get(f"{url}/slimserve/rollout/smollm2", headers=admin, timeout=10)
            return r.status_code == 200 and r.json().get("status") == "paused"

        wait_for(resumed, 60, "a new owner answering with the stored state")
        after = rollout()
        assert after["step"] == 1 and [h["action"] for h in after["history"]] == ["start", "pause"]
        assert after["evidence"]["candidate_requests"] + after["evidence"]["baseline_requests"] == 0  # evidence restarts
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    assert leftovers_after(LEFTOVER, 30) == {}
