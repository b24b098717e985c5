"""Helpers of the chart tests: render helm/slimserve with the real Helm SDK (helm_python),
and strict JSON schemas from the CRDs in ../shared/k8s-crds (read there, never copied)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "slimserve"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
CRDS = REPO.parent / "shared" / "k8s-crds"
RELEASE, NAMESPACE = "demo", "ml"

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (import helm_python) is not installed")


def values_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())


@functools.lru_cache(maxsize=None)
def _chart():
    return helm.Chart.load(CHART)


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's objects for `values` (over the chart's defaults), as a fresh list."""
    return copy.deepcopy(_render_cached(yaml.safe_dump(values or {}, sort_keys=True)))


@functools.lru_cache(maxsize=64)
def _render_cached(values_yaml: str) -> list[dict[str, Any]]:
    manifests = _chart().render(yaml.safe_load(values_yaml), name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def render_error(values: dict[str, Any]) -> str:
    """The message Helm gives for values it refuses (schema or template `fail`)."""
    with pytest.raises(helm.HelmError) as e:
        _chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return str(e.value)


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[o['kind'] for o in objects]}"
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objects)


# --- CRDs as strict JSON schemas -------------------------------------------------------------


def _strict(node: Any) -> Any:
    """An openAPIV3Schema made strict as the API server is: unknown fields are errors except
    under x-kubernetes-preserve-unknown-fields; `nullable` admits null."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if isinstance(out.get("pattern"), str) and "(?i)" in out["pattern"]:
        # Go's RE2 takes inline flags anywhere; Python's re only at the start.
        out["pattern"] = "(?i)" + out["pattern"].replace("(?i)", "")
    return out


_OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@functools.lru_cache(maxsize=None)
def crd_schema(filename: str, version: str) -> dict[str, Any]:
    """Strict schema of one served version of a CRD in ../shared/k8s-crds; skips when absent."""
    path = CRDS / filename
    if not path.is_file():
        pytest.skip(f"CRD {filename} not found: the CRD folder {CRDS} is absent on this machine")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB: C parser
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(ver["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version}"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    schema["properties"]["metadata"] = _OBJECT_META
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return schema


@functools.lru_cache(maxsize=None)
def crd_validator(filename: str, version: str) -> jsonschema.protocols.Validator:
    """A validator for crd_schema(...), made once. (Checking the RayService schema against the
    meta-schema takes seconds; test_crd_schemas_are_strict shows it accepts and rejects.)"""
    return jsonschema.Draft202012Validator(crd_schema(filename, version))
