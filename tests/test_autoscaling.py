"""Per-variant autoscaling (`deployment.autoscaling`, a variant's `autoscaling`): the config's
rules and their messages, what reaches Ray Serve, placement planned for max_replicas, a variant
scaled to zero as the ingress sees it — and, on a real two-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`), load on one variant scaling it onto the second node and back."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest

from conftest import RUN_MARKER_ENV, free_port, leftovers_after, wait_for
from slimserve.serve.config.file import ConfigError, load_config


def model(name="m", deployment=None, variants=None, **extra) -> dict:
    return {"name": name, **({"deployment": deployment} if deployment else {}),
            "variants": variants or [{"name": "a"}], **extra}


def error_of(*models) -> str:
    with pytest.raises(ConfigError) as e:
        load_config({"models": list(models)})
    return "\n".join(e.value.lines)


# --- the config --------------------------------------------------------------------------------


def test_config_validate_reports_every_scaling_error_with_its_path(tmp_path):
    path = tmp_path / "slimserve.yaml"
    path.write_text(textwrap.dedent("""
        models:
          - name: both
            deployment: {replicas: 2, autoscaling: {max_replicas: 3}}
            variants: [{name: a}]
          - name: bounds
            deployment: {autoscaling: {min_replicas: 3, max_replicas: 2}}
            variants: [{name: a}]
          - name: zero
            deployment: {autoscaling: {min_replicas: 0, max_replicas: 2}}
            variants: [{name: a}]
          - name: shadowed
            shadow: spare
            variants: [{name: a}, {name: spare, weight: 0, autoscaling: {min_replicas: 0, max_replicas: 1}}]
          - name: fields
            deployment: {autoscaling: {max_replicas: 2}}
            variants: [{name: a, autoscaling: {max_replicas: 0, target: 4}}]
          - name: alone
            variants: [{name: a}, {name: b, autoscaling: {min_replicas: 2}}]
          - name: initial
            deployment: {autoscaling: {min_replicas: 1, max_replicas: 2, initial_replicas: 3}}
            variants: [{name: a}]
    """))
    r = subprocess.run([sys.executable, "-m", "slimserve.serve.commands.cli", "config", "validate", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    err = r.stderr
    assert ("models.0.deployment: give either `replicas` (a fixed count) or `autoscaling` "
            "(min_replicas..max_replicas), not both") in err
    assert "models.1.deployment.autoscaling: max_replicas 2 is less than min_replicas 3" in err
    assert ("models.2: deployment.autoscaling.min_replicas: 0 (scale to zero) only for a variant that gets no "
            "traffic, but 'a' gets some: weight 1. Set variants.0.autoscaling.min_replicas to 1 or more for it") in err
    assert ("models.3: variants.1.autoscaling.min_replicas: 0 (scale to zero) only for a variant that gets no "
            "traffic, but 'spare' gets some: it is the model's shadow (a copy of every request)") in err
    assert "models.4.variants.0.autoscaling.max_replicas: Input should be greater than or equal to 1" in err
    assert "models.4.variants.0.autoscaling.target: Extra inputs are not permitted" in err
    assert ("models.5: variants.1.autoscaling (the model has no deployment.autoscaling to fill it in): "
            "max_replicas: Field required") in err
    assert "models.6.deployment.autoscaling: initial_replicas 3 is not within min_replicas 1 and max_replicas 2" in err


@pytest.mark.parametrize("extra, why", [
    ({"rollout": {"candidate": "spare"}}, "it is the rollout's candidate"),
    ({"rollout": {"candidate": "a", "baseline": "spare"}}, "it is the rollout's baseline"),
    ({"probe": {}}, "the model's `probe:` sends samples to every variant"),
])
def test_scale_to_zero_is_refused_for_a_variant_that_traffic_reaches(extra, why):
    spare = {"name": "spare", "weight": 0, "autoscaling": {"min_replicas": 0}}
    err = error_of(model(deployment={"autoscaling": {"max_replicas": 2}}, variants=[{"name": "a"}, spare], **extra))
    assert f"models.0: variants.1.autoscaling.min_replicas: 0 (scale to zero) only for a variant that gets no traffic, " \
           f"but 'spare' gets some: {why}" in err


def test_a_weight_0_variant_may_scale_to_zero_and_validate_shows_each_variants_replicas(tmp_path):
    path = tmp_path / "slimserve.yaml"
    path.write_text(textwrap.dedent("""
        models:
          - name: m
            deployment: {autoscaling: {min_replicas: 1, max_replicas: 3, target_ongoing_requests: 16}}
            variants:
              - {name: a, weight: 95}
              - {name: b, weight: 5, autoscaling: {min_replicas: 2, max_replicas: 2}}
              - {name: spare, weight: 0, autoscaling: {min_replicas: 0, max_replicas: 1}}
          - name: fixed
            deployment: {replicas: 2}
            variants: [{name: a}]
    """))
    r = subprocess.run([sys.executable, "-m", "slimserve.serve.commands.cli", "config", "validate", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "m/a: none, weight 95, tp 1, gpu_share auto, replicas 1-3 (autoscaling)" in r.stdout
    assert "m/b: none, weight 5, tp 1, gpu_share auto, replicas 2-2 (autoscaling)" in r.stdout
    assert "m/spare: none, weight 0, tp 1, gpu_share auto, replicas 0-1 (autoscaling)" in r.stdout
    assert "fixed/a: none, weight 1, tp 1, gpu_share auto, replicas 2" in r.stdout
    m = load_config(str(path)).models[0]
    spare = m.autoscaling_for(m.variants[2])
    assert (spare.min_replicas, spare.max_replicas, spare.target_ongoing_requests) == (0, 1, 16)  # the rest: the model's


# --- what reaches Ray Serve ------------------------------------------------------------------


def test_the_llm_config_carries_serves_autoscaling_config():
    from ray.serve.config import AutoscalingConfig

    from slimserve.serve.app import llm_config_for

    cfg = load_config({"models": [model(
        deployment={"autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8,
                                    "upscale_delay_s": 5, "downscale_delay_s": 60}},
        variants=[{"name": "a"}, {"name": "spare", "weight": 0, "autoscaling": {"min_replicas": 0, "max_replicas": 1,
                                                                                 "downscale_to_zero_delay_s": 120}}],
    ), model("fixed", deployment={"replicas": 2})]})
    m, fixed = cfg.models
    a = llm_config_for(cfg, m, m.variants[0], "cpu").deployment_config
    assert "num_replicas" not in a
    assert a["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8,
                                       "upscale_delay_s": 5, "downscale_delay_s": 60}
    AutoscalingConfig(**a["autoscaling_config"])  # Serve takes it as it is
    spare = llm_config_for(cfg, m, m.variants[1], "cpu").deployment_config["autoscaling_config"]
    assert spare == {"min_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 8, "upscale_delay_s": 5,
                     "downscale_delay_s": 60, "downscale_to_zero_delay_s": 120}
    fixed_dc = llm_config_for(cfg, fixed, fixed.variants[0], "cpu").deployment_config
    assert fixed_dc["num_replicas"] == 2 and "autoscaling_config" not in fixed_dc


def test_the_bound_deployment_autoscales_and_only_max_replicas_replaces_the_engines(tmp_path, monkeypatch):
    from slimserve.serve.app import build_app
    from slimserve.serve.rayllm import bound_deployment, bound_engines

    monkeypatch.setenv("SLIMSERVE_ACCELERATOR", "cpu")

    def engine(scaling: dict):
        config = {"cache_dir": str(tmp_path), "models": [model(deployment={"autoscaling": scaling})]}
        return bound_deployment(bound_engines(build_app(config))["m--a"])

    first = engine({"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4})
    assert first._deployment_config.autoscaling_config.max_replicas == 2
    assert first._deployment_config.autoscaling_config.target_ongoing_requests == 4
    # Serve reconfigures a running deployment for a new min, target or delay (same version)...
    assert engine({"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 9})._version == first._version
    # ...but a new maximum replans the cores every replica binds: new engines.
    assert engine({"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4})._version != first._version


# --- placement planned for max_replicas -------------------------------------------------------


def test_cpu_slots_are_planned_for_max_replicas(tmp_path, monkeypatch):
    from slimserve.serve import app as app_module
    from slimserve.serve.app import build_app, llm_config_for
    from slimserve.serve.engine.cpu_binding import SLOTS_ENV, core_binder

    config = {"cache_dir": str(tmp_path), "models": [model(
        deployment={"autoscaling": {"min_replicas": 1, "max_replicas": 3}},
        variants=[{"name": "a"}, {"name": "b", "autoscaling": {"max_replicas": 1}}])]}
    cfg = load_config(config)
    m = cfg.models[0]
    take = core_binder(n_cores=8, n_ranks=4)  # 3 + 1 replicas at their most
    a = llm_config_for(cfg, m, m.variants[0], "cpu", bind_cores=take).runtime_env["env_vars"]
    b = llm_config_for(cfg, m, m.variants[1], "cpu", bind_cores=take).runtime_env["env_vars"]
    assert a[SLOTS_ENV].split(";") == ["0,1", "2,3", "4,5"]  # a slot for each replica Serve may add
    assert b["VLLM_CPU_OMP_THREADS_BIND"] == "6,7" and SLOTS_ENV not in b

    ranks = []
    monkeypatch.setenv("SLIMSERVE_ACCELERATOR", "cpu")
    monkeypatch.setattr(app_module, "core_binder", lambda n_cores, n_ranks: ranks.append(n_ranks) or core_binder(n_cores, n_ranks))
    build_app(config)
    assert ranks == [4]


def test_gpu_shares_are_planned_for_max_replicas():
    from slimserve.serve.app import gpu_plan

    cfg = load_config({"models": [model(
        deployment={"autoscaling": {"min_replicas": 1, "max_replicas": 3}},
        variants=[{"name": "a"}, {"name": "spare", "weight": 0, "autoscaling": {"min_replicas": 0, "max_replicas": 1}}])]})
    shares, problems = gpu_plan(cfg, [1])
    assert shares == {"m/a": 0.25, "m/spare": 0.25} and problems == []  # 4 engines at most on one GPU
    cfg = load_config({"models": [model(deployment={"autoscaling": {"max_replicas": 3}},
                                        engine={"gpu_share": 0.5})]})
    shares, problems = gpu_plan(cfg, [1])
    assert problems == ["m/a#3: needs 0.5 of a GPU; the cluster's nodes have 1 GPU(s), taken by the engines before it"]


def test_slimserve_run_refuses_a_maximum_the_machine_cannot_hold(monkeypatch):
    from slimserve.serve.commands.local import check_fits

    monkeypatch.setenv("SLIMSERVE_ACCELERATOR", "cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    fits = load_config({"models": [model(deployment={"autoscaling": {"max_replicas": 2}})]})
    check_fits(fits)
    too_many = load_config({"models": [model(deployment={"autoscaling": {"max_replicas": 2}},
                                             variants=[{"name": "a"}, {"name": "b"}])]})
    with pytest.raises(SystemExit) as e:
        check_fits(too_many)
    assert "the variants' engines need 4 CPUs at their most replicas (m/a 2, m/b 2), but this machine has 2 cores" in str(e.value)


def test_the_helm_chart_sizes_workers_for_max_replicas():
    from helm_chart import one, render

    def workers(deployment: dict, variant: dict | None = None) -> int:
        values = {"workers": {"gpus": 2}, "slimserve": {"models": [{
            "name": "m", "source": "/models/m", "deployment": deployment,
            "variants": [{"name": "a", **(variant or {})}, {"name": "b"}]}]}}
        return one(render(values), "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"]

    assert workers({"replicas": 1}) == 1  # 2 engines, 2 GPUs a pod
    assert workers({"autoscaling": {"min_replicas": 1, "max_replicas": 3}}) == 3  # 6 engines at most
    assert workers({"autoscaling": {"max_replicas": 1}}, {"autoscaling": {"max_replicas": 3}}) == 2  # 3 + 1


# --- a variant at zero replicas, as the ingress sees it ----------------------------------------


class CountingHandle:
    """A variant's DeploymentHandle that counts calls (a call to a deployment at zero replicas
    would start one)."""

    def __init__(self, name: str):
        self.deployment_name = name
        self.calls = 0
        handle = self

        class _Info:
            @staticmethod
            async def remote():
                handle.calls += 1
                return {"pid": 1}

        self.slimserve_info = _Info()


def board_with(replica_states: dict, status: str = "HEALTHY", lost: bool = False):
    from slimserve.serve.http.health import HealthBoard

    handle = CountingHandle("SlimServer:m--spare")
    dep = SimpleNamespace(status=status, message="", replica_states=replica_states)
    overview = SimpleNamespace(applications={"app": SimpleNamespace(deployments={"SlimServer:m--spare": dep})})
    board = HealthBoard({"m--spare": handle}, "app", lambda: overview)
    if lost:
        board.mark_lost("m--spare", RuntimeError("its node went"))
    for _ in range(3):  # three probe rounds
        asyncio.run(board.refresh())
    return board.state_of("m--spare"), handle.calls


def test_a_variant_at_zero_replicas_is_idle_and_never_woken_by_the_probe():
    from ray.serve._private.common import ReplicaState

    from slimserve.serve.http.health import State

    idle, calls = board_with({})  # Serve's view of a deployment scaled to zero: HEALTHY, no replica
    assert idle.state is State.IDLE and idle.available and calls == 0
    assert idle.describe() == "idle: scaled to zero: a request waits for a replica to start (cold start)"
    going, calls = board_with({ReplicaState.STOPPING: 1}, "DOWNSCALING")  # the last replica drains
    assert going.state is State.IDLE and calls == 0
    # Waking (a replica starting) or up: as before, Serve's view and then the engine's record.
    waking, calls = board_with({ReplicaState.STARTING: 1}, "UPSCALING")
    assert waking.state is State.READY and calls == 3
    up, calls = board_with({ReplicaState.RUNNING: 1})
    assert up.state is State.READY and calls == 3


def test_a_lost_replica_is_forgotten_only_once_serve_has_no_replica_at_all():
    from ray.serve._private.common import ReplicaState

    from slimserve.serve.http.health import State

    still_stopping, calls = board_with({ReplicaState.STOPPING: 1}, "DOWNSCALING", lost=True)
    assert still_stopping.state is State.UNHEALTHY and calls == 0
    gone, calls = board_with({}, lost=True)
    assert gone.state is State.IDLE and gone.available and calls == 0


def test_the_split_is_the_weights_whatever_the_replica_counts():
    """The ingress picks a variant by weight, then Serve picks one of its replicas: replica
    counts are not an input of the split, a rollout's step or the ingress at all (same spec, same
    ingress version); an idle variant is reached only when forced."""
    from slimserve.serve.app import build_ingress_spec, ingress_version
    from slimserve.serve.handoff import IngressSpec
    from slimserve.serve.http.health import State, VariantHealth
    from slimserve.serve.http.split import Router

    variants = [{"name": "a", "weight": 80}, {"name": "b", "weight": 20}, {"name": "spare", "weight": 0}]
    rollout = {"candidate": "b", "baseline": "a"}
    fixed = load_config({"models": [model(variants=variants, rollout=rollout)]})
    scaled = load_config({"models": [model(
        deployment={"autoscaling": {"min_replicas": 1, "max_replicas": 8}}, rollout=rollout,
        variants=[{**variants[0], "autoscaling": {"min_replicas": 4}}, variants[1],
                  {**variants[2], "autoscaling": {"min_replicas": 0, "max_replicas": 1}}])]})
    assert build_ingress_spec(scaled) == build_ingress_spec(fixed)
    assert ingress_version({"spec": build_ingress_spec(scaled)}) == ingress_version({"spec": build_ingress_spec(fixed)})

    spec = IngressSpec.model_validate(build_ingress_spec(scaled))
    router = Router(spec.splits, sticky=spec.sticky)
    states = {"m--a": VariantHealth(State.READY), "m--b": VariantHealth(State.READY),
              "m--spare": VariantHealth(State.IDLE, "scaled to zero")}
    picks = [router.route("m", None, f"user{i}", lambda mid: states[mid].available,
                          lambda mid: states[mid].describe()).variant for i in range(4000)]
    assert picks.count("spare") == 0
    assert abs(picks.count("b") / len(picks) - 0.2) < 0.03
    forced = router.route("m", "spare", None, lambda mid: states[mid].available, lambda mid: states[mid].describe())
    assert forced.model_id == "m--spare"  # forwarded; Serve starts a replica for it


# --- on a two-node Ray cluster -------------------------------------------------------------------

APP = "autoscale"
LEFTOVER = r"raylet|gcs_server|ray::|EngineCore|VLLM"


def actor_nodes(class_name: str) -> list[str]:
    """Node ids of the live actors of `class_name` (one entry per actor)."""
    import ray

    return sorted(a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                  if a["State"] == "ALIVE" and a["ActorClassName"] == class_name)


def replicas(deployment: str, state: str = "RUNNING") -> int:
    from ray import serve

    counts = serve.status().applications[APP].deployments[deployment].replica_states
    return sum(n for s, n in counts.items() if str(getattr(s, "value", s)) == state)


@pytest.mark.standalone
def test_load_on_one_variant_scales_it_onto_the_second_node_and_back_without_a_failed_request(tmp_path, monkeypatch):
    """`busy` scales between 1 and 2 replicas; `spare` (weight 0, min_replicas 0) stays at zero
    throughout, idle, never woken by the ingress's probes. The head node holds one engine, so
    the second replica can only go to the worker. Closed-loop clients: 3 while scaling up, 1
    while scaling down (the replica Serve removes finishes its requests first). Then a request
    forced to `spare` waits for its cold start, and Serve takes it back to zero."""
    import logging

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from slimserve.serve.app import build_app

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    t_start = time.monotonic()
    monkeypatch.setenv(RUN_MARKER_ENV, uuid.uuid4().hex)
    # Serve's load figures every second instead of every 10 (read by the processes the cluster starts).
    monkeypatch.setenv("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    monkeypatch.setenv("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    results: list[tuple[int, str | None, str]] = []  # (status, variant, phase)
    phase = {"now": "up"}
    stop = threading.Event()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        fast = {"upscale_delay_s": 0, "downscale_delay_s": 3, "look_back_period_s": 2, "target_ongoing_requests": 1}
        config = {
            "cache_dir": str(tmp_path / "artifacts"),
            "models": [{"name": "smollm2", "source": "default", "engine": {"max_model_len": 512},
                        "deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": 2, **fast}},
                        "variants": [{"name": "busy"},
                                     {"name": "spare", "weight": 0, "autoscaling": {
                                         "min_replicas": 0, "max_replicas": 1, "downscale_to_zero_delay_s": 2}}]}],
            "ingress": {"health_probe_interval_s": 2},
        }
        serve.run_many([serve.RunTarget(build_app(config), name=APP, route_prefix="/")],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        busy, spare = "SlimServer:smollm2--busy", "SlimServer:smollm2--spare"
        head = ray.get_runtime_context().get_node_id()
        wait_for(lambda: actor_nodes(f"ServeReplica:{APP}:{busy}") == [head], 120, "busy's first replica on the head")
        worker = cluster.add_node(num_cpus=1)  # joins while that engine starts
        wait_for(lambda: serve.status().applications[APP].status == "RUNNING", 300, "the app running")
        ready_s = time.monotonic() - t_start

        def states() -> dict:
            (card,) = [c for c in httpx.get(f"{url}/v1/models", timeout=30).json()["data"] if c["id"] == "smollm2"]
            return {v["variant"]: (v["state"], v["available"]) for v in card["metadata"]["variants"]}
        wait_for(lambda: states() == {"busy": ("ready", True), "spare": ("idle", True)}, 30, "busy ready, spare idle")

        body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}

        def client(n: int):
            with httpx.Client(base_url=url, timeout=120) as http:
                while not stop.is_set() and (n == 0 or phase["now"] == "up"):
                    r = http.post("/v1/completions", json=body)
                    results.append((r.status_code, r.headers.get("x-slimserve-variant"), phase["now"]))

        spare_seen: set[int] = set()
        clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(3)]
        for t in clients:
            t.start()

        def scaled_up() -> bool:
            spare_seen.add(replicas(spare) + replicas(spare, "STARTING"))
            return replicas(busy) == 2
        t0 = time.monotonic()
        wait_for(scaled_up, 300, "busy's second replica running")
        up_s = time.monotonic() - t0
        assert actor_nodes(f"ServeReplica:{APP}:{busy}") == sorted([head, worker.node_id])
        served_at_two = len(results)
        wait_for(lambda: len(results) >= served_at_two + 6, 60, "answers with two replicas")

        phase["now"] = "down"  # two of the three clients stop
        t0 = time.monotonic()

        def scaled_down() -> bool:
            spare_seen.add(replicas(spare) + replicas(spare, "STARTING"))
            return replicas(busy) == 1 and replicas(busy, "STOPPING") == 0
        wait_for(scaled_down, 120, "busy back to one replica")
        down_s = time.monotonic() - t0
        answered_down = sum(1 for *_, p in results if p == "down")
        stop.set()
        for t in clients:
            t.join(120)
        assert len(actor_nodes(f"ServeReplica:{APP}:{busy}")) == 1

        failed = [r for r in results if r[0] != 200]
        assert failed == [], failed[:5]
        assert {v for _, v, _ in results} == {"busy"}  # weight 0: none of the public name's traffic
        assert answered_down >= 3, answered_down  # requests went on while a replica went
        assert spare_seen == {0}  # never woken: not by the load, not by the probes
        assert states()["spare"] == ("idle", True)

        # A request forced to the idle variant waits for its cold start; then it goes back to zero.
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 4},
                       headers={"x-slimserve-variant": "spare"}, timeout=300)
        cold_s = time.monotonic() - t0
        assert r.status_code == 200 and r.headers["x-slimserve-variant"] == "spare", r.text
        t0 = time.monotonic()
        wait_for(lambda: replicas(spare) + replicas(spare, "STOPPING") == 0 and states()["spare"] == ("idle", True),
                 120, "spare back to zero replicas")
        zero_s = time.monotonic() - t0
        print(f"\nautoscaling: app ready {ready_s:.0f} s; 1 -> 2 replicas in {up_s:.0f} s under 3 clients; "
              f"2 -> 1 in {down_s:.0f} s under 1; {len(results)} requests, none failed; a forced request to the "
              f"idle variant answered after {cold_s:.0f} s (cold start), back to zero {zero_s:.0f} s later")
    finally:
        stop.set()
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    assert leftovers_after(LEFTOVER, 60) == {}
