"""The chart's output checked the way an API server would: core kinds with kubernetes-validate
(strict), custom resources against strict JSON schemas made from the CRDs in ../shared/k8s-crds."""

from __future__ import annotations

import copy

import jsonschema
import pytest

from helm_chart import CI_VALUES, crd_validator, one, render, values_file

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")

KUBE_VERSION = "1.30.0"  # the chart's kubeVersion is >=1.26
CORE_KINDS = {"Service", "Secret", "PersistentVolumeClaim", "NetworkPolicy"}
CRD_FILES = {
    "RayService": ("ray.io_rayservices.yaml", "v1"),
    "PodMonitor": ("monitoring.coreos.com_podmonitors.yaml", "v1"),
    "ServiceMonitor": ("monitoring.coreos.com_servicemonitors.yaml", "v1"),
    "PrometheusRule": ("monitoring.coreos.com_prometheusrules.yaml", "v1"),
}
CI_NAMES = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]


def _all_objects(name: str):
    values = values_file(name)
    if name == "cpu":
        values["apiKeys"] = {"keys": ["k"]}  # renders the Secret too
    return render(values)


@pytest.mark.parametrize("name", CI_NAMES)
def test_core_kinds_strictly_valid(name):
    objects = _all_objects(name)
    assert {o["kind"] for o in objects} - set(CRD_FILES) <= CORE_KINDS
    for obj in objects:
        if obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("name", CI_NAMES)
def test_ray_pod_templates_strictly_valid(name):
    # The pod templates inside the RayService, checked as core PodTemplates (containers,
    # ports, resources, volumes) beside the CRD's own schema.
    cluster = one(render(values_file(name)), "RayService")["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(pod_template, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("name", CI_NAMES)
def test_custom_resources_match_their_crds(name):
    validated = set()
    for obj in render(values_file(name)):
        if obj["kind"] in CRD_FILES:
            crd_validator(*CRD_FILES[obj["kind"]]).validate(obj)
            validated.add(obj["kind"])
    expected = set(CRD_FILES) if name == "ab" else {"RayService"}  # ab turns every monitor on
    assert validated == expected


def test_crd_schemas_are_strict():
    # An unknown field deep inside the RayService (a typo in a container) must be an error.
    rayservice = one(render(values_file("gpu-tp2")), "RayService")
    crd_validator(*CRD_FILES["RayService"]).validate(rayservice)
    broken = copy.deepcopy(rayservice)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(jsonschema.ValidationError, match="'resource' was unexpected"):
        crd_validator(*CRD_FILES["RayService"]).validate(broken)
    broken = copy.deepcopy(rayservice)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "4"
    with pytest.raises(jsonschema.ValidationError):
        crd_validator(*CRD_FILES["RayService"]).validate(broken)
    monitor = one(render(values_file("ab")), "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["metricRelabelConfigs"] = []  # Prometheus' name, not the CRD's
    with pytest.raises(jsonschema.ValidationError, match="metricRelabelConfigs"):
        crd_validator(*CRD_FILES["PodMonitor"]).validate(monitor)


def test_multi_node_autoscaler_and_worker_groups_checked_by_the_crd():
    # The multi-node example's new parts (autoscalerOptions, a second worker group) sit under
    # the CRD's strict schema, not under preserved unknown fields: a typo there is an error.
    rayservice = one(render(values_file("multi-node")), "RayService")
    validator = crd_validator(*CRD_FILES["RayService"])
    validator.validate(rayservice)
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and len(cluster["workerGroupSpecs"]) == 2

    def broken(change):
        obj = copy.deepcopy(rayservice)
        change(obj["spec"]["rayClusterConfig"])
        return obj

    with pytest.raises(jsonschema.ValidationError, match="'idleTimeout' was unexpected"):
        validator.validate(broken(lambda c: c["autoscalerOptions"].update(idleTimeout=60)))
    with pytest.raises(jsonschema.ValidationError, match="'Fast' is not one of"):
        validator.validate(broken(lambda c: c["autoscalerOptions"].update(upscalingMode="Fast")))
    with pytest.raises(jsonschema.ValidationError, match="'maxReplicas' is a required property"):
        validator.validate(broken(lambda c: c["workerGroupSpecs"][1].pop("maxReplicas")))
    with pytest.raises(jsonschema.ValidationError, match="'3' is not of type 'integer'"):
        validator.validate(broken(lambda c: c["workerGroupSpecs"][1].update(maxReplicas="3")))
