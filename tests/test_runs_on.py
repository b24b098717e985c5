"""Methods declare where their checkpoints run (device kinds, minimum CUDA compute capability, as
vLLM's quantization configs do): `config validate` refuses a variant whose method cannot run on the
hosts the config targets, with its field path, before any build; the on-load hook checks the same
against the host; a host of the other kind refuses a config that names one."""

from __future__ import annotations

import pytest
import yaml

from slimserve.optimizers.registry import RunsOn, methods, parse
from slimserve.serve.commands import cli
from slimserve.serve.config.file import ConfigError, load_config
from slimserve.serve.config.hosts import HostSettings
from slimserve.serve.engine.onload import check_runs_on


def config(hosts: dict | None, *optimizations) -> dict:
    variants = [{"name": "baseline"}] + [{"name": f"v{i}", "optimization": o} for i, o in enumerate(optimizations, 1)]
    return {"models": [{"name": "m", "variants": variants}], **({"hosts": hosts} if hosts is not None else {})}


def errors(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(data)
    return e.value.lines


def test_every_method_declares_where_it_runs():
    for name, cls in methods().items():
        assert isinstance(cls.runs_on, RunsOn) and cls.runs_on.devices <= {"cpu", "cuda"}, name
    fp8 = parse("fp8").platforms()
    assert fp8.devices == {"cuda"} and fp8.min_capability == (8, 9)
    assert parse("w8a8").platforms() == RunsOn(frozenset({"cpu", "cuda"}), (7, 5), parse("w8a8").runs_on.reason)
    # Weight-only int: vLLM CPU takes 4-bit grouped weights only.
    for spec in ({"method": "rtn", "bits": 4}, {"method": "gptq"}, {"method": "qat"}, {"method": "qlora"}):
        assert "cpu" in parse(spec).platforms().devices, spec
    for spec in ({"method": "rtn"}, {"method": "gptq", "bits": 8}, {"method": "gptq", "group_size": None},
                 {"method": "qat", "bits": 8}, {"method": "qlora", "bits": 8}):
        assert parse(spec).platforms().devices == {"cuda"}, spec
    for name in ("none", "structured", "sparse", "gradual_prune", "gradual_sparse"):
        assert parse(name).platforms() == RunsOn(), name


def test_config_validate_refuses_a_method_the_targeted_hosts_cannot_run(tmp_path, capsys):
    lines = errors(config({"accelerator": "cpu"}, "fp8", {"method": "rtn", "bits": 8}, {"method": "rtn", "bits": 4}, "w8a8"))
    assert lines == [
        "models.0.variants.1.optimization.method: fp8 needs a CUDA GPU of compute capability >= 8.9 (vLLM's FP8 "
        "W8A8 kernels need Ada, Hopper or later; its CPU build has no kernels for FP8); this config targets cpu hosts "
        "(hosts.accelerator: cpu)",
        "models.0.variants.2.optimization.method: rtn needs a CUDA GPU of compute capability >= 7.5 (vLLM's CPU build "
        "has no kernels for 8-bit or ungrouped weights: its WNA16 kernels take 4-bit weights with a group size); this "
        "config targets cpu hosts (hosts.accelerator: cpu)",
    ]
    # GPUs below the method's minimum compute capability; at or above it, fine.
    [line] = errors(config({"accelerator": "gpu", "gpu_compute_capability": 8.0}, "fp8", "w8a8"))
    assert line.startswith("models.0.variants.1.optimization.method: fp8 needs a CUDA GPU of compute capability >= 8.9")
    assert line.endswith("this config targets GPUs of compute capability 8.0 (hosts.gpu_compute_capability)")
    for hosts in ({"accelerator": "gpu", "gpu_compute_capability": 8.9}, {"accelerator": "gpu", "gpu_compute_capability": 9},
                  {"accelerator": "gpu"}, {"accelerator": "auto"}, None):
        load_config(config(hosts, "fp8", {"method": "rtn", "bits": 8}))  # the host checks what the config leaves open
    # A capability is a GPU's, written major.minor.
    assert errors(config({"accelerator": "cpu", "gpu_compute_capability": 9.0})) == [
        "hosts: gpu_compute_capability 9 is for GPU hosts: set accelerator: gpu, or leave it out"]
    assert "major.minor" in errors(config({"accelerator": "gpu", "gpu_compute_capability": 8.95}))[0]
    # The command: the same lines, exit 1, before any build.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config({"accelerator": "cpu"}, "fp8")))
    assert cli.main(["config", "validate", str(path)]) == 1
    assert "models.0.variants.1.optimization.method: fp8 needs a CUDA GPU" in capsys.readouterr().err


def test_a_host_of_the_other_kind_refuses_the_config():
    HostSettings(accelerator="auto").check_host("cpu")
    HostSettings(accelerator="gpu").check_host("gpu")
    with pytest.raises(ValueError, match="hosts.accelerator: this config targets gpu hosts, but this host is `cpu`"):
        HostSettings(accelerator="gpu").check_host("cpu")


def test_the_on_load_hook_checks_the_host_before_any_build():
    with pytest.raises(ValueError, match=r"m/v: fp8 needs a CUDA GPU .*no kernels for FP8.*this host runs vLLM's CPU build"):
        check_runs_on(parse("fp8"), "cpu", "m/v")
    with pytest.raises(ValueError, match=r"m/v: fp8 needs a CUDA GPU of compute capability >= 8.9 .*this host's GPU "
                                         r"has compute capability 8.0"):
        check_runs_on(parse("fp8"), "gpu", "m/v", capability=(8, 0))
    check_runs_on(parse("fp8"), "gpu", "m/v", capability=(9, 0))
    check_runs_on(parse({"method": "rtn", "bits": 4}), "cpu", "m/v")
    with pytest.raises(ValueError, match="m/v: rtn needs a CUDA GPU"):
        check_runs_on(parse({"method": "rtn", "bits": 8}), "cpu", "m/v")
