"""The Helm chart (helm/slimserve), rendered offline with the real Helm SDK: one test per
template, sizing of GPU workers by tensor parallelism, and values that must be refused.
Kubernetes/CRD schema checks: test_helm_k8s_schemas.py; alert rules: test_alert_rules.py."""

from __future__ import annotations

import copy

import base64
import importlib.util
import json

import pytest
import yaml

from helm_chart import CHART, CI_VALUES, NAMESPACE, RELEASE, helm, kinds, one, render, render_error, values_file
from slimserve.serve.config.file import ConfigError, load_config

FULLNAME = f"{RELEASE}-slimserve"
CI_NAMES = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]


def test_ci_values_files_exist():
    assert set(CI_NAMES) >= {"cpu", "gpu-tp2", "ab", "multi-node"}


@pytest.mark.parametrize("name", ["defaults", *CI_NAMES])
def test_lint_strict(name):
    values = None if name == "defaults" else values_file(name)
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Strict lint: no warnings or errors (severity 2, 3); info (e.g. "icon is recommended") is fine.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --- values.schema.json ----------------------------------------------------------------------


def _generator():
    spec = importlib.util.spec_from_file_location("generate_values_schema", CHART.parent / "generate_values_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_values_schema_slimserve_part_matches_config_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["slimserve"] == _generator().slimserve_schema(), (
        "helm/slimserve/values.schema.json is out of date with serve/config/schema.py or the optimizer registry: "
        "run .venv/bin/python helm/generate_values_schema.py"
    )


def test_values_schema_optimization_enum_is_the_registry():
    from slimserve.optimizers.registry import methods

    schema = json.loads((CHART / "values.schema.json").read_text())
    optimization = schema["properties"]["slimserve"]["$defs"]["Variant"]["properties"]["optimization"]
    assert optimization["then"]["enum"] == sorted(methods())
    assert optimization["else"]["properties"]["method"]["enum"] == sorted(methods())


def test_chart_defaults_are_a_valid_slimserve_config():
    load_config(helm.Chart.load(CHART).values["slimserve"])


# --- rayservice.yaml -------------------------------------------------------------------------


def _serve_config(objects) -> dict:
    return yaml.safe_load(one(objects, "RayService")["spec"]["serveConfigV2"])


def _containers(rayservice) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


@pytest.mark.parametrize("name", CI_NAMES)
def test_rayservice_serve_config_is_the_values_slimserve_config(name):
    from ray.serve.schema import ServeDeploySchema

    values = values_file(name)
    serve_config = _serve_config(render(values))
    ServeDeploySchema.model_validate(serve_config)  # what KubeRay hands to Ray Serve
    (app,) = serve_config["applications"]
    assert app["import_path"] == "slimserve.serve.app:build_app"
    assert (app["name"], app["route_prefix"]) == ("slimserve", "/")
    # The values' slimserve config, its weights moved to the ingress's user_config.
    expected, weights = copy.deepcopy(values["slimserve"]), {}
    for model in expected["models"]:
        weights[model["name"]] = {v["name"]: v.pop("weight", 1) for v in model["variants"]}
    assert app["args"] == expected
    assert app["deployments"] == [{"name": "SlimserveIngress", "user_config": {"weights": weights}}]
    cfg = load_config(app["args"])  # what build_app will accept
    assert cfg.cache_dir == values["slimserve"]["cache_dir"]


@pytest.mark.parametrize(
    "name, accelerator, workers, gpus_per_worker",
    [
        ("cpu", "cpu", 1, None),  # 2 engines x 1 rank x 1 CPU on 2-CPU pods
        ("gpu-tp2", "gpu", 4, "2"),  # 2 variants x 2 replicas, TP 2 on 2-GPU pods
        ("ab", "gpu", 3, "1"),  # 3 variants x 1 replica, TP 1 on 1-GPU pods
    ],
)
def test_rayservice_workers_follow_tensor_parallelism(name, accelerator, workers, gpus_per_worker):
    rayservice = one(render(values_file(name)), "RayService")
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["groupName"] == f"{accelerator}-workers"
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == workers
    (container,) = group["template"]["spec"]["containers"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]
    assert resources["limits"].get("nvidia.com/gpu") == gpus_per_worker
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def _gpu_values(gpus: int, tps: list[int], replicas: int = 1) -> dict:
    variants = [{"name": f"v{i}", "engine": {"tensor_parallel_size": tp}} for i, tp in enumerate(tps)]
    return {
        "workers": {"gpus": gpus},
        "slimserve": {"models": [{"name": "m", "source": "/models/m", "deployment": {"replicas": replicas}, "variants": variants}]},
    }


@pytest.mark.parametrize(
    "gpus, tps, replicas, workers",
    [
        (1, [1], 1, 1),
        (8, [1, 1, 1], 2, 1),  # 6 one-GPU engines fit one 8-GPU pod
        (4, [2, 2, 1], 1, 2),  # two TP-2 groups fill one pod; the TP-1 engine takes another
        (8, [4], 3, 2),  # three TP-4 groups: two per 8-GPU pod
        (2, [2, 2], 3, 6),  # a TP-2 group per 2-GPU pod
        (3, [2], 2, 2),  # a TP-2 group never spans pods: one per 3-GPU pod
    ],
)
def test_gpu_worker_count(gpus, tps, replicas, workers):
    group = one(render(_gpu_values(gpus, tps, replicas)), "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert group["replicas"] == workers


@pytest.mark.parametrize(
    "shares, workers",
    [
        ([0.5, 0.5], 1),  # an A/B of two half-GPU variants: one 1-GPU pod
        ([0.5, 0.5, 0.5], 2),  # a third half does not fit beside them
        ([0.3, None], 2),  # unset = a whole GPU, which does not share
    ],
)
def test_gpu_worker_count_with_gpu_shares(shares, workers):
    values = _gpu_values(1, [1] * len(shares))
    for variant, share in zip(values["slimserve"]["models"][0]["variants"], shares):
        if share is not None:
            variant["engine"]["gpu_share"] = share
    group = one(render(values), "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert group["replicas"] == workers


def test_cpu_worker_count_uses_cpus_per_rank():
    values = _gpu_values(1, [2, 2])
    values.update(accelerator="cpu", workers={"cpus": 4})
    values["slimserve"]["models"][0]["deployment"]["num_cpus_per_worker"] = 2
    group = one(render(values), "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert group["replicas"] == 2  # each engine: 2 ranks x 2 CPUs = a whole 4-CPU pod


def test_worker_count_can_be_set():
    values = _gpu_values(2, [2])
    values["workers"]["replicas"] = 5
    group = one(render(values), "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert group["replicas"] == 5


@pytest.mark.parametrize("drain, grace", [(None, 330), (45, 75), (600.5, 631)])
def test_rayservice_pods_wait_out_the_ingress_drain(drain, grace):
    """Kubernetes' default 30 s grace would cut streams the ingress drains for up to
    ingress.drain_timeout_s: every pod's grace is the drain plus 30 s for Serve and Ray."""
    values = copy.deepcopy(yaml.safe_load((CHART / "values.yaml").read_text()))
    if drain is not None:
        values["slimserve"]["ingress"] = {"drain_timeout_s": drain}
    cluster = one(render(values), "RayService")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    assert [p["spec"]["terminationGracePeriodSeconds"] for p in pods] == [grace] * len(pods)


@pytest.mark.parametrize("name", CI_NAMES)
def test_rayservice_pods_env_and_cache_mount(name):
    values = values_file(name)
    rayservice = one(render(values), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    for pod in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        (container,) = pod["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["SLIMSERVE_ACCELERATOR"] == values["accelerator"]
        assert env["HF_HUB_OFFLINE"] == "1"
        assert env["SLIMSERVE_HOME"] == "/var/lib/slimserve"
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"  # the default, as in `slimserve run`
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["artifact-cache"] == values["slimserve"]["cache_dir"]
        assert mounts["dshm"] == "/dev/shm"
        assert container["image"] == "slimserve/slimserve:" + values.get("image", {}).get("tag", "0.1.0")
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == 8080
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert set(mounts) <= set(volumes)
    assert cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"


def test_throughput_optimized_mode_can_be_turned_off():
    values = {**values_file("cpu"), "rayServeThroughputOptimized": False}
    cluster = one(render(values), "RayService")["spec"]["rayClusterConfig"]
    for pod in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        (container,) = pod["spec"]["containers"]
        assert {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "0"} in container["env"]


def test_weight_change_only_changes_the_ingress_user_config():
    # KubeRay updates Serve in place when only serveConfigV2 changes (a changed cluster spec
    # would make it build a whole new Ray cluster), and Serve applies a change of user_config
    # alone to the live ingress: the app's args, and so the engines, stay as they were.
    before = values_file("ab")
    after = values_file("ab")
    for variant, weight in zip(after["slimserve"]["models"][0]["variants"], [34, 33, 33]):
        variant["weight"] = weight
    old, new = one(render(before), "RayService"), one(render(after), "RayService")
    assert old["spec"]["rayClusterConfig"] == new["spec"]["rayClusterConfig"]
    old_app, new_app = (yaml.safe_load(x["spec"]["serveConfigV2"])["applications"][0] for x in (old, new))
    assert old_app["args"] == new_app["args"]
    assert all("weight" not in v for m in new_app["args"]["models"] for v in m["variants"])
    ingress = {d["name"]: d for d in new_app["deployments"]}["SlimserveIngress"]
    names = [v["name"] for v in after["slimserve"]["models"][0]["variants"]]
    model = after["slimserve"]["models"][0]["name"]
    assert ingress["user_config"] == {"weights": {model: dict(zip(names, [34, 33, 33]))}}
    assert old_app["deployments"] != new_app["deployments"]


def test_rayservice_serve_service():
    service = one(render(values_file("ab")), "RayService")["spec"]["serveService"]
    assert service["metadata"]["name"] == FULLNAME
    assert service["spec"]["ports"] == [{"name": "serve", "port": 8000, "targetPort": 8000}]


# --- multi-node: worker groups and KubeRay's autoscaler (ci/multi-node-values.yaml) ------------


def _cluster(values) -> dict:
    return one(render(values), "RayService")["spec"]["rayClusterConfig"]


def _groups(cluster) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster["workerGroupSpecs"]}


def test_multi_node_example_cpu_head_and_gpu_worker_groups():
    values = values_file("multi-node")
    cluster = _cluster(values)
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no engine on the head
    (head_container,) = head["template"]["spec"]["containers"]
    assert not any("nvidia.com/gpu" in r for r in head_container["resources"].values())
    groups = _groups(cluster)
    assert list(groups) == ["gpu-1x", "gpu-2x"]
    expected = {  # replicas, min, max, GPUs, CPUs, memory per pod
        "gpu-1x": (2, 1, 6, "1", "8", "64Gi"),
        "gpu-2x": (0, 0, 3, "2", "16", "128Gi"),
    }
    for name, (replicas, low, high, gpus, cpus, memory) in expected.items():
        group = groups[name]
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (replicas, low, high)
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["requests"] == container["resources"]["limits"] == {
            "cpu": cpus, "memory": memory, "nvidia.com/gpu": gpus,
        }
        # Pod settings a group leaves out come from `workers`.
        assert group["template"]["spec"]["tolerations"] == values["workers"]["tolerations"]
        assert group["template"]["spec"]["nodeSelector"] == {"node-pool": "gpu"}
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
    # Every engine's tensor-parallel group fits a pod of some group.
    largest = max(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) for g in groups.values())
    cfg = load_config(values["slimserve"])
    assert all(m.engine_for(v).tensor_parallel_size <= largest for m in cfg.models for v in m.variants)


def test_multi_node_example_autoscaling_on():
    cluster = _cluster(values_file("multi-node"))
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"] == {
        "version": "v2",
        "upscalingMode": "Default",
        "idleTimeoutSeconds": 600,
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
    }
    notes = helm.Chart.load(CHART).render(values_file("multi-node"), name=RELEASE, namespace=NAMESPACE)["slimserve/templates/NOTES.txt"]
    assert "2 GPU worker pod(s) to start" in notes
    assert "gpu-1x 1-6, gpu-2x 0-3 pod(s)" in notes


def test_multi_node_example_cache_is_one_rwx_claim_on_every_pod():
    values = values_file("multi-node")
    objects = render(values)
    pvc = one(objects, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes mount it
    assert pvc["spec"]["storageClassName"] == "shared-rwx"
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    assert len(pods) == 3  # the head and both GPU groups
    for pod in pods:
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "artifact-cache"]
        assert volume == {"name": "artifact-cache", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}}
        (container,) = pod["spec"]["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["artifact-cache"] == values["slimserve"]["cache_dir"]


def test_autoscaling_off_by_default():
    cluster = _cluster(None)
    assert cluster["enableInTreeAutoscaling"] is False
    assert "autoscalerOptions" not in cluster
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2  # the defaults' 2 one-GPU engines


def _whole_gpu_values(gpus: int, tps: list[int], replicas: int = 1) -> dict:
    values = _gpu_values(gpus, tps, replicas)
    values["slimserve"]["models"][0]["engine"] = {"gpu_share": 1}
    return values


def test_one_worker_group_autoscaled():
    values = _whole_gpu_values(1, [1, 1])  # 2 one-GPU engines: 2 pods to start with
    values["autoscaling"] = {"enabled": True}
    values["workers"]["maxReplicas"] = 5
    (group,) = _cluster(values)["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 0, 5)
    values["workers"]["minReplicas"] = 1
    (group,) = _cluster(values)["workerGroupSpecs"]
    assert group["minReplicas"] == 1
    values["workers"]["maxReplicas"] = 1
    assert "workers.maxReplicas is 1, but the variants' engine replicas need 2 worker pods" in render_error(values)
    del values["workers"]["maxReplicas"]
    assert "workers.maxReplicas: set the most worker pods" in render_error(values)


def test_worker_groups_without_autoscaling_have_fixed_pods():
    values = _whole_gpu_values(1, [1, 2])
    values["workerGroups"] = [{"name": "small", "gpus": 1, "replicas": 1}, {"name": "large", "gpus": 2, "replicas": 1}]
    cluster = _cluster(values)
    assert cluster["enableInTreeAutoscaling"] is False
    groups = _groups(cluster)
    assert [(g["replicas"], g["minReplicas"], g["maxReplicas"]) for g in groups.values()] == [(1, 1, 1), (1, 1, 1)]
    assert groups["large"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_autoscaling_needs_an_explicit_gpu_share():
    # slimserve plans automatic GPU shares against the GPUs up at deploy time; an autoscaled
    # cluster that is still growing has too few, and engines would split GPUs.
    values = values_file("multi-node")
    del values["slimserve"]["models"][0]["engine"]["gpu_share"]
    message = render_error(values)
    assert "autoscaling.enabled: model llama-8b, variant bf16 has no engine.gpu_share" in message
    values["slimserve"]["models"][0]["variants"][0]["engine"] = {"gpu_share": 1}
    values["slimserve"]["models"][0]["variants"][1]["engine"] = {"gpu_share": 0.5}
    render(values)  # a variant's own share counts; tensor-parallel engines take whole GPUs anyway


def _multi_node_with(change) -> dict:
    values = values_file("multi-node")
    change(values)
    return values


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda v: v["workerGroups"][1].pop("maxReplicas"), "workerGroups[1] (gpu-2x): set maxReplicas"),
        (lambda v: v.update(autoscaling={"enabled": False}), "workerGroups[1] (gpu-2x): set replicas"),
        (lambda v: v["workerGroups"][1].update(name="gpu-1x"), "workerGroups[1] (gpu-1x): the group name gpu-1x is used twice"),
        (lambda v: v["workerGroups"][1].update(gpus=1),
         "model qwen-32b, variant bf16: tensor_parallel_size 2 needs 2 GPUs inside one worker pod, but the largest workerGroups[].gpus is 1"),
        (lambda v: [g.update(maxReplicas=1) for g in v["workerGroups"]],
         "the variants' engine replicas need 8 GPUs in all, but the groups hold 3 at most (maxReplicas x gpus)"),
        (lambda v: v["workerGroups"][0].update(replicas=7), "worker group gpu-1x: minReplicas 1 <= replicas 7 <= maxReplicas 6 does not hold"),
        (lambda v: v["workerGroups"][0].update(name="GPU_1x"), "/workerGroups/0/name"),
        (lambda v: v["workerGroups"][0].update(gpu=1), "additional properties 'gpu' not allowed"),
        (lambda v: v["autoscaling"].update(upscalingMode="Fast"), "/autoscaling/upscalingMode"),
    ],
)
def test_worker_groups_and_autoscaling_refused(change, expected):
    assert expected in render_error(_multi_node_with(change))


# --- cache-pvc.yaml --------------------------------------------------------------------------


def _cache_volumes(objects) -> list[dict]:
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [v for pod in pods for v in pod["spec"]["volumes"] if v["name"] == "artifact-cache"]


def test_cache_pvc_created_and_shared_by_all_pods():
    objects = render(values_file("gpu-tp2"))
    pvc = one(objects, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == f"{FULLNAME}-cache"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert pvc["spec"]["storageClassName"] == "shared-rwx"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for volume in _cache_volumes(objects):
        assert volume["persistentVolumeClaim"] == {"claimName": pvc["metadata"]["name"]}


def test_cache_existing_claim_or_volume():
    objects = render({"cache": {"existingClaim": "shared-artifacts"}})
    assert "PersistentVolumeClaim" not in kinds(objects)
    assert all(v["persistentVolumeClaim"]["claimName"] == "shared-artifacts" for v in _cache_volumes(objects))
    objects = render(values_file("cpu"))
    assert "PersistentVolumeClaim" not in kinds(objects)
    assert all(v == {"name": "artifact-cache", "emptyDir": {}} for v in _cache_volumes(objects))


# --- secret.yaml -----------------------------------------------------------------------------


def _api_keys_env(objects) -> list[dict]:
    containers = _containers(one(objects, "RayService"))
    envs = [[e for e in c["env"] if e["name"] == "SLIMSERVE_API_KEYS"] for c in containers]
    return [e for env in envs for e in env] if all(envs) else []


def test_api_keys_secret():
    objects = render(values_file("ab"))
    secret = one(objects, "Secret")
    assert base64.b64decode(secret["data"]["api-keys"]).decode() == "team-a-key,team-b-key"
    refs = _api_keys_env(objects)
    assert len(refs) == 2  # head and workers
    assert all(r["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "api-keys"} for r in refs)


def test_api_keys_existing_secret_and_none():
    objects = render({"apiKeys": {"existingSecret": "team-keys", "secretKey": "keys"}})
    assert "Secret" not in kinds(objects)
    assert {r["valueFrom"]["secretKeyRef"]["name"] for r in _api_keys_env(objects)} == {"team-keys"}
    objects = render()
    assert "Secret" not in kinds(objects)
    assert _api_keys_env(objects) == []


def test_admin_keys_are_a_secret_of_their_own():
    values = values_file("ab")
    values["adminKeys"] = {"keys": ["ops-key"]}
    objects = render(values)
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    admin = secrets[f"{FULLNAME}-admin-keys"]
    assert base64.b64decode(admin["data"]["admin-keys"]).decode() == "ops-key"
    containers = _containers(one(objects, "RayService"))
    refs = [e for c in containers for e in c["env"] if e["name"] == "SLIMSERVE_ADMIN_KEYS"]
    assert len(refs) == 2 and all(r["valueFrom"]["secretKeyRef"]["name"] == f"{FULLNAME}-admin-keys" for r in refs)
    assert not any(e["name"] == "SLIMSERVE_ADMIN_KEYS" for c in _containers(one(render(), "RayService")) for e in c["env"])


def test_a_rollout_block_goes_through_values_and_is_checked_by_the_schema():
    values = values_file("ab")
    model = values["slimserve"]["models"][0]
    rollout = {"candidate": model["variants"][1]["name"], "steps": [10, 50, 100], "min_requests": 100}
    model["rollout"] = rollout
    app = yaml.safe_load(one(render(values), "RayService")["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["models"][0]["rollout"] == rollout
    model["rollout"] = {**rollout, "min_requests": 0}
    assert "min_requests" in render_error(values)


# --- metrics-service.yaml, podmonitor.yaml, servicemonitor.yaml ------------------------------


def _relabel_regex_of_scrape_config() -> str:
    from helm_chart import REPO

    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (rule,) = config["scrape_configs"][0]["metric_relabel_configs"]
    return rule["regex"]


def _pod_labels(objects) -> list[dict]:
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [p["metadata"]["labels"] for p in pods]


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_metrics_service_selects_every_ray_pod():
    objects = render(values_file("ab"))
    service = [o for o in objects if o["kind"] == "Service"][0]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics"}]
    assert all(_selects(service["spec"]["selector"], labels) for labels in _pod_labels(objects))


def test_monitors_off_by_default():
    assert not {"PodMonitor", "ServiceMonitor", "PrometheusRule"} & set(kinds(render()))


def _check_relabeling(endpoint: dict):
    (relabel,) = endpoint["metricRelabelings"]
    assert relabel == {
        "sourceLabels": ["__name__"],
        "regex": _relabel_regex_of_scrape_config(),
        "targetLabel": "__name__",
        "replacement": "$1",
        "action": "replace",
    }


def test_podmonitor():
    objects = render(values_file("ab"))
    monitor = one(objects, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert all(_selects(monitor["spec"]["selector"]["matchLabels"], labels) for labels in _pod_labels(objects))
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    _check_relabeling(endpoint)


def test_servicemonitor():
    objects = render(values_file("ab"))
    monitor = one(objects, "ServiceMonitor")
    service = [o for o in objects if o["kind"] == "Service"][0]
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    _check_relabeling(endpoint)


# --- NOTES.txt -------------------------------------------------------------------------------


def test_notes():
    notes = helm.Chart.load(CHART).render(values_file("gpu-tp2"), name=RELEASE, namespace=NAMESPACE)["slimserve/templates/NOTES.txt"]
    assert f"svc/{FULLNAME} 8000:8000" in notes
    assert "4 GPU worker pod(s)" in notes
    assert "/var/lib/slimserve/artifacts" in notes


# --- values that must be refused, with a message naming what is wrong --------------------------


def test_negative_replicas_refused():
    values = values_file("gpu-tp2")
    values["slimserve"]["models"][0]["deployment"]["replicas"] = -1
    message = render_error(values)
    assert "/slimserve/models/0/deployment/replicas" in message and "minimum" in message


def test_negative_worker_count_refused():
    message = render_error({"workers": {"replicas": -2}})
    assert "/workers/replicas" in message and "minimum" in message


@pytest.mark.parametrize("optimization", ["awq", {"method": "awq", "bits": 4}])
def test_unknown_optimization_method_refused(optimization):
    values = values_file("ab")
    values["slimserve"]["models"][0]["variants"][1]["optimization"] = optimization
    message = render_error(values)
    assert "/slimserve/models/0/variants/1/optimization" in message and "'w8a8'" in message
    # The same config, were it rendered, is refused by slimserve itself at build_app time.
    with pytest.raises(ConfigError, match="unknown optimization method 'awq'"):
        load_config(values["slimserve"])


def test_bad_method_params_refused_by_load_config_of_rendered_config():
    # Method parameters are left to slimserve's own check (the schema checks the method name).
    values = values_file("gpu-tp2")
    values["slimserve"]["models"][0]["variants"][1]["optimization"]["bits"] = 3
    (app,) = _serve_config(render(values))["applications"]
    with pytest.raises(ConfigError, match=r"models\.0\.variants\.1\.optimization"):
        load_config(app["args"])


def test_tensor_parallel_larger_than_a_worker_refused():
    values = values_file("gpu-tp2")
    values["workers"]["gpus"] = 1
    message = render_error(values)
    assert "model llama-8b, variant bf16: tensor_parallel_size 2 needs 2 GPUs inside one worker pod" in message
    assert "workers.gpus is 1" in message


def test_unknown_keys_refused():
    message = render_error({"worker": {"gpus": 2}})
    assert "additional properties 'worker' not allowed" in message
    values = values_file("cpu")
    values["slimserve"]["models"][0]["replicas"] = 2  # belongs under deployment
    assert "additional properties 'replicas' not allowed" in render_error(values)


def test_cache_dir_required():
    values = values_file("cpu")
    del values["slimserve"]["cache_dir"]
    # Helm merges the chart's default cache_dir back in; a null removes it.
    values["slimserve"]["cache_dir"] = None
    assert "cache_dir" in render_error(values)


# --- networkpolicy.yaml ----------------------------------------------------------------------

RAY_ONLY_PORTS = {6379, 8265, 10001, 52365}  # GCS, dashboard / job API, Ray client, dashboard agent


def _rules_reaching(policy: dict, port: int) -> list[dict]:
    """The ingress rules that let traffic reach `port` (a rule without ports allows every port)."""
    return [r for r in policy["spec"]["ingress"] if "ports" not in r or any(p["port"] == port for p in r["ports"])]


def test_network_policy_opens_only_the_serve_port_to_clients():
    policy = one(render(), "NetworkPolicy")
    selector = {"app.kubernetes.io/name": "slimserve", "app.kubernetes.io/instance": RELEASE}
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    # The Serve port from anywhere: a rule with that port and no `from`.
    assert any("from" not in r for r in _rules_reaching(policy, 8000))
    # Ray's metrics port: from the cluster's pods (Prometheus), not from outside the cluster.
    metrics = _rules_reaching(policy, 8080)
    assert metrics and all("from" in r for r in metrics), metrics
    assert {"namespaceSelector": {}} in [p for r in metrics for p in r["from"]]
    # Ray's own ports: only from the cluster's pods or the KubeRay operator, never from anyone.
    for port in RAY_ONLY_PORTS:
        rules = _rules_reaching(policy, port)
        assert rules and all("from" in r for r in rules), (port, rules)
        peers = [peer for r in rules for peer in r["from"]]
        assert all(peer.get("podSelector", {}).get("matchLabels") in (selector, {"app.kubernetes.io/name": "kuberay-operator"})
                   for peer in peers), (port, peers)
    # 10001 (Ray client) and 6379 (GCS): the cluster's pods only.
    for port in (6379, 10001):
        assert [p["podSelector"]["matchLabels"] for r in _rules_reaching(policy, port) for p in r["from"]] == [selector]


def test_network_policy_admin_peers_clients_peers_and_off():
    ops = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}}]
    gateway = [{"podSelector": {"matchLabels": {"app": "gateway"}}}]
    policy = one(render({"networkPolicy": {"adminFrom": ops, "clientsFrom": gateway}}), "NetworkPolicy")
    assert ops[0] in [p for r in _rules_reaching(policy, 10001) for p in r.get("from", [])]
    assert ops[0] not in [p for r in _rules_reaching(policy, 6379) for p in r.get("from", [])]
    serve_rules = [r for r in _rules_reaching(policy, 8000) if "ports" in r]
    assert [r["from"] for r in serve_rules] == [gateway]
    assert "NetworkPolicy" not in kinds(render({"networkPolicy": {"enabled": False}}))
    assert "operatorFrom" in render_error({"networkPolicy": {"operatorFrom": []}})
