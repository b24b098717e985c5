"""Reading a config: a slimserve config (YAML or a dict), or a Ray Serve config file whose
applications run `slimserve.serve.app:build_app` (as deploy/ and the Helm chart write them).
Every error comes out as `field.path: reason`, all of them at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from slimserve.serve.config.schema import SlimserveConfig


def format_errors(e: ValidationError) -> list[str]:
    """One line per error: `field.path: reason`."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return lines


class ConfigError(Exception):
    def __init__(self, source: str, lines: list[str], what: str = "invalid slimserve config"):
        self.lines = lines
        super().__init__(f"{what} {source}:\n" + "\n".join(f"  {l}" for l in lines))


def load_config(data: str | Path | dict[str, Any]) -> SlimserveConfig:
    """Validate a config given as a dict, or as the path of a YAML file."""
    source = "(inline)"
    if not isinstance(data, dict):
        source = str(data)
        data = _read_yaml(source)
        if not isinstance(data, dict):
            raise ConfigError(source, ["(top level): expected a mapping with a `models` list"])
    return _validated(data, source)


def _validated(data: dict[str, Any], source: str) -> SlimserveConfig:
    try:
        return SlimserveConfig.model_validate(data)
    except ValidationError as e:
        lines = format_errors(e)
        # pydantic skips list-level checks once an item fails; report duplicates anyway.
        lines += [l for l in _duplicate_names(data) if l not in lines]
        raise ConfigError(source, lines) from None


def _duplicate_names(data: dict[str, Any]) -> list[str]:
    def dupes(items: Any) -> list[str]:
        names = [i.get("name") for i in items if isinstance(i, dict)] if isinstance(items, list) else []
        return sorted({n for n in names if n is not None and names.count(n) > 1})

    models = data.get("models")
    lines = [f"models: Value error, duplicate model names: {d}" for d in [dupes(models)] if d]
    for i, m in enumerate(models if isinstance(models, list) else []):
        if isinstance(m, dict) and (d := dupes(m.get("variants"))):
            lines.append(f"models.{i}.variants: duplicate variant names: {d}")
    return [l.replace("Value error, ", "") for l in lines]


def _read_yaml(path: str) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(path, [e.strerror or str(e)], what="cannot read") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(path, [f"(yaml) {e}"]) from None


# Ray Serve config files (`serve run FILE`, deploy/*.yaml, a RayService's serveConfigV2) name
# slimserve's application builder; its `args` are a slimserve config, or {config: PATH}.
BUILD_APP = "slimserve.serve.app:build_app"
DEFAULT_APP_NAME = "slimserve"
# The ingress deployment's name; a Serve config sets live weights as its `user_config`
# ({weights: {MODEL: {VARIANT: W}}}, what the Helm chart writes).
INGRESS_DEPLOYMENT = "SlimserveIngress"


@dataclasses.dataclass(frozen=True)
class ServeApp:
    """One slimserve application: its name and route prefix in Ray Serve, and its config."""

    name: str
    route_prefix: str
    config: SlimserveConfig


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """A file as `slimserve config validate / run / optimize` read it: a plain slimserve config
    (one application, `slimserve` at `/`) or a Ray Serve config (one per application whose
    import_path is slimserve's build_app)."""

    kind: Literal["slimserve", "serve"]
    apps: list[ServeApp]
    http_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # a Serve config's `http_options`
    # What `slimserve run` does not use from a Serve config: other applications, Serve-only settings.
    ignored: list[str] = dataclasses.field(default_factory=list)


def load_config_file(path: str | Path) -> ConfigFile:
    """Read a plain slimserve config or a Ray Serve config file. Every error of every slimserve
    application is reported, with the application's index and name in its path
    (`applications.0[slimserve].args.models.0.variants.1.weight: ...`)."""
    source = str(path)
    data = _read_yaml(source)
    if not isinstance(data, dict):
        raise ConfigError(source, [
            "(top level): expected a slimserve config (a mapping with a `models` list) "
            "or a Ray Serve config (a mapping with an `applications` list)"
        ])
    if "applications" not in data:
        return ConfigFile("slimserve", [ServeApp(DEFAULT_APP_NAME, "/", _validated(data, source))])

    lines: list[str] = []
    try:
        from ray.serve.schema import ServeDeploySchema
    except ImportError:  # pragma: no cover - ray is a dependency; the args are still checked below
        ServeDeploySchema = None
    if ServeDeploySchema is not None:
        try:
            ServeDeploySchema.model_validate(data)
        except ValidationError as e:
            lines += format_errors(e)
    http = data.get("http_options") if isinstance(data.get("http_options"), dict) else {}
    ignored = [k for k in data if k not in ("applications", "http_options")]
    ignored += [f"http_options.{k}" for k in http if k not in ("host", "port")]
    apps: list[ServeApp] = []
    applications = data["applications"] if isinstance(data["applications"], list) else []
    for i, app in enumerate(applications):
        if not isinstance(app, dict):
            continue  # the schema's error names it
        name = str(app.get("name", "default"))
        where = f"applications.{i}[{name}]"
        if app.get("import_path") != BUILD_APP:
            ignored.append(f"{where} (import_path {app.get('import_path')!r})")
            continue
        ignored += [f"{where}.{k}" for k in app if k not in ("name", "route_prefix", "import_path", "args", "deployments")]
        try:
            config = _app_config(app.get("args") or {}, where)
            deployments = app.get("deployments") if isinstance(app.get("deployments"), list) else []
            for j, dep in enumerate(deployments):
                if isinstance(dep, dict) and dep.get("name") == INGRESS_DEPLOYMENT and "user_config" in dep:
                    config = _with_weights(config, dep["user_config"], f"{where}.deployments.{j}.user_config")
                    ignored += [f"{where}.deployments.{j}.{k}" for k in dep if k not in ("name", "user_config")]
                else:
                    ignored.append(f"{where}.deployments.{j}")
            apps.append(ServeApp(name, str(app.get("route_prefix") or "/"), config))
        except ConfigError as e:
            lines += e.lines
    if not lines and not apps:
        lines.append(f"applications: no application has import_path {BUILD_APP}")
    if lines:
        raise ConfigError(source, lines, what="invalid Ray Serve config")
    return ConfigFile("serve", apps, {k: http[k] for k in ("host", "port") if k in http}, ignored)


def _app_config(args: Any, where: str) -> SlimserveConfig:
    """An application's `args` as build_app reads them: the config itself, or {config: PATH}
    (a relative PATH is read from the current directory, as `serve run` reads it)."""
    if not isinstance(args, dict):
        raise ConfigError(where, [f"{where}.args: expected a slimserve config or {{config: PATH}}"])
    if set(args) == {"config"}:
        ref = str(args["config"])
        prefix = f"{where}.args.config ({ref})"
        try:
            data = _read_yaml(ref)
        except ConfigError as e:
            what = "cannot read" if "(yaml)" not in e.lines[0] else "invalid YAML"
            raise ConfigError(where, [f"{prefix}: {what}: {e.lines[0].removeprefix('(yaml) ')}"]) from None
        if not isinstance(data, dict):
            raise ConfigError(where, [f"{prefix}: expected a mapping with a `models` list"])
        sep = ": "
    else:
        data, prefix, sep = args, f"{where}.args", "."
    try:
        return _validated(data, where)
    except ConfigError as e:
        raise ConfigError(where, [_under(prefix, sep, line) for line in e.lines]) from None


def _with_weights(config: SlimserveConfig, user_config: Any, where: str) -> SlimserveConfig:
    """The config with the weights of the ingress's `user_config` ({weights: {MODEL: {VARIANT:
    W}}}; a variant left out keeps its weight), as the live ingress will route."""
    weights = user_config.get("weights") if isinstance(user_config, dict) else None
    if not isinstance(weights, dict) or set(user_config) != {"weights"}:
        raise ConfigError(where, [f"{where}: expected {{weights: {{MODEL: {{VARIANT: WEIGHT}}}}}}"])
    data = config.model_dump(mode="json", exclude_unset=True)
    models = {m["name"]: m for m in data["models"]}
    lines = []
    for name, new in weights.items():
        if name not in models:
            lines.append(f"{where}.weights.{name}: not a model of this application (has: {', '.join(models)})")
            continue
        variants = {v["name"]: v for v in models[name]["variants"]}
        for variant, weight in (new or {}).items() if isinstance(new, dict) else [(None, None)]:
            if variant not in variants:
                lines.append(f"{where}.weights.{name}.{variant}: not a variant of {name} (has: {', '.join(variants)})")
            else:
                variants[variant]["weight"] = weight
    if lines:
        raise ConfigError(where, lines)
    try:
        return _validated(data, where)
    except ConfigError as e:
        raise ConfigError(where, [f"{where}.weights -> {line}" for line in e.lines]) from None


def _under(prefix: str, sep: str, line: str) -> str:
    """An error line of a slimserve config, moved under `prefix`."""
    if line.startswith("(top level)"):
        return prefix + line.removeprefix("(top level)")
    return f"{prefix}{sep}{line}"
