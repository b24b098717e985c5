"""Writes the `slimserve` part of helm/slimserve/values.schema.json from the config schema itself
(serve/config/schema.py, pydantic) and the optimizer registry, so `helm install` rejects what
`slimserve config validate` rejects (types, ranges, unknown keys, unknown optimization methods)
without a second hand-kept copy. The chart's own keys stay hand-written in that file.

    .venv/bin/python helm/generate_values_schema.py           # rewrite the file
    .venv/bin/python helm/generate_values_schema.py --check   # exit 1 when it is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).resolve().parent / "slimserve" / "values.schema.json"
# Where the config's definitions live inside the values schema (refs are JSON pointers to it).
DEFS_POINTER = "#/properties/slimserve/$defs/"


def _clean(node: Any) -> Any:
    """Drop pydantic's generated titles and point refs into the values schema."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "title" and isinstance(value, str):
                continue
            if key == "$ref":
                value = DEFS_POINTER + value.removeprefix("#/$defs/")
            out[key] = _clean(value)
        return out
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def optimization_schema(methods: list[str], description: str) -> dict[str, Any]:
    """A method name, or {method: NAME, ...params}. Params are checked by load_config."""
    return {
        "description": description,
        "type": ["string", "object"],
        "if": {"type": "string"},
        "then": {"enum": methods},
        "else": {"required": ["method"], "properties": {"method": {"enum": methods}}},
    }


def slimserve_schema() -> dict[str, Any]:
    from slimserve.optimizers.registry import methods
    from slimserve.serve.config.schema import SlimserveConfig

    schema = SlimserveConfig.model_json_schema()
    defs = schema.pop("$defs")
    variant = defs["Variant"]["properties"]
    variant["optimization"] = optimization_schema(sorted(methods()), variant["optimization"]["description"])
    # A variant's engine block has the model's engine fields (all optional, as overrides).
    variant["engine"] = {"$ref": "#/$defs/EngineSettings", "description": variant["engine"]["description"]}
    defs.pop("Optimization", None)
    schema["description"] = (
        "The slimserve config (serve/config/schema.py), passed as is to slimserve.serve.app:build_app in "
        "serveConfigV2. cache_dir is required here: the artifact cache volume is mounted there."
    )
    schema["required"] = sorted({*schema.get("required", []), "cache_dir"})
    schema["properties"]["cache_dir"]["pattern"] = "^/"
    return _clean({**schema, "$defs": dict(sorted(defs.items()))})


def updated(current: dict[str, Any]) -> dict[str, Any]:
    out = dict(current)
    out["properties"] = {**current["properties"], "slimserve": slimserve_schema()}
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str]) -> int:
    current = json.loads(SCHEMA_FILE.read_text())
    if "--check" in argv:
        if current["properties"]["slimserve"] != slimserve_schema():
            print(f"{SCHEMA_FILE}: `slimserve` is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    SCHEMA_FILE.write_text(render(updated(current)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
