"""The build's reports, typed (optimizers/build/build_report.py): the optimizer child's report and
the artifact manifest that stores it are read as pydantic models where they cross a process
boundary, and the readers (the quality gate, the on-load hook's hand-off, the ingress's engine
record, /v1/models, `slimserve optimize`) use their fields.

Real parts: the optimizer's child process (a stand-in script that prints a report line; the real
worker building a tiny model in the one `heavy` test), the artifact cache on disk, the health
board with a stand-in engine handle (Ray's call replaced by the record a SlimServer sends)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from slimserve.optimizers.build import pipeline
from slimserve.optimizers.build.build_report import ArtifactManifest, BuildReport, QualityReport
from slimserve.optimizers.build.pipeline import OptimizationFailed, optimize
from slimserve.optimizers.cache.store import MANIFEST, ArtifactCache
from slimserve.optimizers.quality import HeldOut, QualityGateFailed
from slimserve.serve.config.retry import transient
from slimserve.serve.handoff import EngineRecord, PreparedCheckpoint
from slimserve.serve.http.health import HealthBoard, State
from slimserve.serve.handoff import VariantRoute
from slimserve.serve.http.model_cards import public_card, public_engine_facts, without_paths
from slimserve.serve.http.split import Router

# Small enough to build and measure in seconds on CPU: pydoc text is always there.
SPEC = {"method": "structured", "mlp_keep": 0.5, "mlp_multiple": 8,
        "calibration": {"text": "pydoc", "samples": 2, "seq_len": 16}}
HELD_OUT = {"text": "pydoc", "windows": 2, "seq_len": 16}
QUALITY = {"held_out": HELD_OUT, "base_perplexity": 10.0, "perplexity": 11.0, "ppl_ratio": 1.1, "seconds": 0.5}
# What the worker prints for a build whose quality was measured: its method's facts, the run's time, the measurement.
REPORT = {"intermediate_size": [64, 32], "healing": None, "optimize_seconds": 2.5, "quality": QUALITY}


def stand_in_child(monkeypatch, folder: Path, result_line: str) -> None:
    """The optimizer's child replaced by a script that writes a checkpoint file and `result_line`."""
    script = folder / "child.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        (Path(json.loads(sys.argv[1])["out"]) / "config.json").write_text("{{}}")
        print({result_line!r})
    """))
    monkeypatch.setattr(pipeline, "_child_command", lambda python, request: [sys.executable, str(script), request])


def base_folder(folder: Path) -> Path:
    """A base checkpoint as far as optimize() looks before the child runs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"w" * 64)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A build whose child reported REPORT: (result, base, cache folder)."""
    root = tmp_path_factory.mktemp("built")
    base, cache = base_folder(root / "base"), root / "cache"
    with pytest.MonkeyPatch.context() as m:
        stand_in_child(m, root, "SLIMSERVE_RESULT " + json.dumps(REPORT))
        r = optimize(str(base), SPEC, cache, {"held_out": HELD_OUT}, build_timeout_s=60)
    return r, base, cache


def test_a_manifest_written_by_the_current_code_reads_back_as_the_model(built):
    r, base, cache = built
    on_disk = json.loads((r.path / MANIFEST).read_text())
    assert ArtifactManifest.model_validate(on_disk) == r.manifest
    report = r.manifest.report
    assert isinstance(report, BuildReport) and isinstance(report.quality, QualityReport)
    assert report.quality.held_out == HeldOut(**HELD_OUT) and report.quality.ppl_ratio == 1.1
    assert report.optimize_seconds == 2.5 and report.agreement is None
    # The method's own facts ride along as written, and nothing the child did not report is
    # written (no `"agreement": null`): the manifest's report is the JSON the child printed.
    assert report.model_extra == {"intermediate_size": [64, 32], "healing": None}
    assert on_disk["report"] == REPORT
    assert r.manifest.method == "structured" and r.manifest.base == str(base) and r.manifest.key == r.path.name
    assert set(r.manifest.files) == {"config.json"} and r.manifest.files["config.json"].size == 2
    # Read back from disk by the next start (no child runs: the stand-in is gone): the same model.
    again = optimize(str(base), SPEC, cache, {"held_out": HELD_OUT})
    assert again.cache_hit is True and again.manifest == r.manifest
    again.hold.release()


def test_the_quality_gate_and_the_on_load_hand_off_read_the_typed_report(built):
    r, base, cache = built
    with pytest.raises(QualityGateFailed, match=r"perplexity 11.00 vs 10.00 for the base \(ratio 1.100 > max_ppl_ratio 1.05\)"):
        optimize(str(base), SPEC, cache, {"held_out": HELD_OUT, "max_ppl_ratio": 1.05})
    fallback = optimize(str(base), SPEC, cache, {"held_out": HELD_OUT, "max_ppl_ratio": 1.05, "on_quality_fail": "serve_base"})
    assert fallback.path == base and fallback.quality_gate == "failed: serving base" and fallback.hold is None
    assert fallback.manifest.report.quality.ppl_ratio == 1.1  # what the gate judged, still reported
    passed = optimize(str(base), SPEC, cache, {"held_out": HELD_OUT, "max_ppl_ratio": 1.2})
    assert passed.path == r.path and passed.quality_gate == "passed"
    passed.hold.release()
    # The hand-off the on-load hook builds from a result (serve/engine/onload.py) keeps the typed report.
    prep = PreparedCheckpoint(method=fallback.method, checkpoint=str(fallback.path), base=str(fallback.base),
                              cache_hit=fallback.cache_hit, prepare_seconds=1.0, build_seconds=fallback.manifest.build_seconds,
                              report=fallback.manifest.report, quality_gate=fallback.quality_gate)
    assert prep.report.quality.ppl_ratio == 1.1 and prep.build_seconds == r.manifest.build_seconds


def test_slimserve_optimize_prints_the_typed_report(built, capsys):
    from slimserve.serve.commands import cli

    r, base, cache = built
    config = Path(cache).parent / "slimserve.yaml"
    config.write_text(json.dumps({"cache_dir": str(cache), "models": [{"name": "tiny", "source": str(base), "variants": [
        {"name": "pruned", "optimization": SPEC, "quality": {"held_out": HELD_OUT}}]}]}))
    assert cli.main(["optimize", str(config)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:4] == ["tiny/pruned", "structured", "hit", "2.50"]
    assert row[6:9] == ["10.00", "11.00", "1.10"]


@pytest.mark.heavy
def test_the_real_workers_report_reads_back_as_the_model(tmp_path):
    """The real worker (a child process, torch and transformers) builds a two-layer model with the
    default model's tokenizer and measures its quality: the manifest it leaves reads as the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimserve.optimizers.models import resolve_source

    tiny, default = tmp_path / "tiny", resolve_source("default")
    tiny.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default / name, tiny / name)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=json.loads((default / "config.json").read_text())["vocab_size"], max_position_embeddings=64,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tiny)
    r = optimize(str(tiny), SPEC, tmp_path / "cache", {"held_out": HELD_OUT}, build_timeout_s=300)
    on_disk = json.loads((r.path / MANIFEST).read_text())
    assert ArtifactManifest.model_validate(on_disk) == r.manifest
    q = r.manifest.report.quality
    assert q.held_out == HeldOut(**HELD_OUT) and q.ppl_ratio == pytest.approx(q.perplexity / q.base_perplexity, rel=1e-3)
    # The method's own time, measured in the child: part of the whole build the parent timed.
    assert 0 < r.manifest.report.optimize_seconds <= r.manifest.build_seconds, r.manifest
    assert r.manifest.report.model_extra["intermediate_size"] == [64, 32]
    assert set(on_disk["report"]) == {"optimize_seconds", "quality", *r.manifest.report.model_extra}  # no null fields added


# --- a report from the child that does not read ---------------------------------------------------


@pytest.mark.parametrize("report, named", [
    ({"quality": {**QUALITY, "ppl_ratio": None}}, ["report.optimize_seconds: Field required",
                                                  "report.quality.ppl_ratio: Input should be a valid number"]),
    ({"optimize_seconds": 1.0, "quality": {k: v for k, v in QUALITY.items() if k != "perplexity"}},
     ["report.quality.perplexity: Field required"]),
    ({"optimize_seconds": 1.0, "agreement": {"top1_agreement": "most", "kl_per_token": 0.1, "tokens": 8}},
     ["report.agreement.top1_agreement: Input should be a valid number"]),
    ("{not json", ["report: Invalid JSON"]),
])
def test_a_malformed_report_from_the_child_is_a_clear_error_naming_the_field(tmp_path, monkeypatch, report, named):
    line = "SLIMSERVE_RESULT " + (report if isinstance(report, str) else json.dumps(report))
    stand_in_child(monkeypatch, tmp_path, line)
    with pytest.raises(OptimizationFailed) as e:
        optimize(str(base_folder(tmp_path / "base")), SPEC, tmp_path / "cache", {"measure": False}, build_timeout_s=60)
    first = str(e.value).splitlines()[0]  # what /v1/models and the CLI show
    assert "reported a malformed result" in first
    for field in named:
        assert field in first, first
    assert not transient(e.value)  # the same child reports the same thing again: no retry
    assert ArtifactCache(tmp_path / "cache").entries() == []  # nothing cached, nothing served


def test_a_manifest_this_slimserve_does_not_read_is_a_rebuild_not_a_crash(tmp_path, monkeypatch, caplog):
    stand_in_child(monkeypatch, tmp_path, "SLIMSERVE_RESULT " + json.dumps({"optimize_seconds": 0.5, "scheme": "x"}))
    base, spec, cache = str(base_folder(tmp_path / "base")), SPEC, tmp_path / "cache"
    first = optimize(base, spec, cache, {"measure": False}, build_timeout_s=60)
    assert first.cache_hit is False and first.manifest.report.model_extra == {"scheme": "x"}
    first.hold.release()
    # As an older slimserve might have left it: a report without a field this one needs.
    path = first.path / MANIFEST
    old = json.loads(path.read_text())
    del old["report"]["optimize_seconds"]
    path.write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="slimserve.optimizers.cache.store"):
        again = optimize(base, spec, cache, {"measure": False}, build_timeout_s=60)
    assert again.cache_hit is False and again.path == first.path  # rebuilt in place
    assert again.manifest.report.optimize_seconds == 0.5
    assert any("does not read (report.optimize_seconds: Field required): to be rebuilt" in m for m in caplog.messages), caplog.messages
    assert ArtifactManifest.model_validate_json(path.read_text()) == again.manifest


# --- the engine's record: server -> Ray -> ingress ----------------------------------------------------


class EngineHandle:
    """A variant's deployment handle whose `slimserve_info` answers what a SlimServer sends."""

    deployment_name = "SlimServer:m--a"

    def __init__(self, sent: dict):
        async def remote():
            return sent

        self.slimserve_info = SimpleNamespace(remote=remote)


def board_state(sent: dict):
    async def scenario():
        status = SimpleNamespace(applications={"app": SimpleNamespace(deployments={
            "SlimServer:m--a": SimpleNamespace(status="HEALTHY", message="")})})
        board = HealthBoard({"m--a": EngineHandle(sent)}, "app", lambda: status)
        await board.refresh()
        return board.state_of("m--a")

    return asyncio.run(scenario())


def test_the_engine_record_reaches_v1_models_typed_and_without_paths(tmp_path):
    report = BuildReport.model_validate({"optimize_seconds": 2.0, "quality": QUALITY, "scheme": "W8A8"})
    prep = PreparedCheckpoint(method="w8a8", checkpoint=str(tmp_path / "cache" / "abc123"), base=str(tmp_path / "base"),
                              cache_hit=True, prepare_seconds=0.3, build_seconds=40.0, report=report)
    # What SlimServer.slimserve_info sends: a plain dict (it crosses Ray as one).
    sent = EngineRecord(pid=7, timings={"start_seconds": 3.0}, optimization=prep, checkpoint=str(tmp_path / "cache" / "abc123"),
                        quantization=None, dtype="bfloat16").model_dump(exclude_unset=True)
    assert json.loads(json.dumps(sent)) == sent and "failed" not in sent and "retrying" not in sent
    health = board_state(sent)
    assert health.state is State.READY
    record = health.engine
    assert isinstance(record, EngineRecord) and record.optimization.report.quality.ppl_ratio == 1.1
    assert record.optimization.report.model_extra == {"scheme": "W8A8"}
    public = public_engine_facts(record)
    assert public["optimization"]["artifact"] == "abc123" and public["optimization"]["report"]["quality"]["ppl_ratio"] == 1.1
    assert "pid" not in public and "checkpoint" not in public and "base" not in public["optimization"]
    assert str(tmp_path) not in json.dumps(public)
    assert public["quantization"] is None and public["dtype"] == "bfloat16"  # set, so shown: not quantized
    assert public_engine_facts(None) == {}


def test_a_failed_variant_and_a_record_that_does_not_read(tmp_path):
    failed = board_state(EngineRecord(pid=7, failed="OptimizationFailed: out of disk\nlast lines").model_dump(exclude_unset=True))
    assert failed.state is State.FAILED and failed.reason == "failed to load: OptimizationFailed: out of disk"
    assert "optimization" not in public_engine_facts(failed.engine) and "failed" not in public_engine_facts(failed.engine)
    odd = board_state({"pid": 7, "optimization": {"method": "w8a8", "checkpoint": "/x", "base": "/y", "cache_hit": True,
                                                   "prepare_seconds": 1.0, "report": {"quality": {"ppl_ratio": 1.0}}}})
    assert odd.state is State.FAILED and odd.engine is None
    assert "optimization.report.optimize_seconds" in odd.reason and "optimization.report.quality.perplexity" in odd.reason


def test_an_engine_of_the_slimserve_before_typed_reports_still_reads():
    """During an upgrade the new ingress may ask engines that still run the old code: their `{}`
    ("nothing built", "not prepared") reads as None, not as a failure."""
    base = board_state({"optimization": {"method": "none", "checkpoint": "/m/base", "base": "/m/base", "cache_hit": None,
                                         "prepare_seconds": 0.1, "build_seconds": None, "report": {}, "quality_gate": "passed"},
                        "pid": 7, "timings": {}})
    assert base.state is State.READY and base.engine.optimization.report is None
    failed = board_state({"optimization": {}, "pid": 7, "timings": {}, "failed": "ValueError: no kernels"})
    assert failed.state is State.FAILED and failed.reason == "failed to load: ValueError: no kernels"
    assert failed.engine.optimization is None


def test_a_failure_shown_in_v1_models_names_no_absolute_path(tmp_path, monkeypatch):
    """`unavailable_because` quotes the engine's failure: paths in it keep their last part only,
    even where a folder's name holds a space (which no pattern can tell from the text around it)."""
    home, slim = tmp_path / "my home", tmp_path / "slim serve"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SLIMSERVE_HOME", str(slim))
    failed = board_state(EngineRecord(pid=7, failed=(
        f"OSError: cannot read {slim}/artifacts/abc/model.safetensors: disk error; "
        f"base {home}/models/config.json, /opt/models/x.bin\nlast lines")).model_dump(exclude_unset=True))
    card = public_card("m", Router({"m": [VariantRoute("a", "m--a", 1.0)]}), lambda model_id: failed)
    reason = card.metadata["variants"][0]["unavailable_because"]
    assert reason == ("failed: failed to load: OSError: cannot read …/model.safetensors: disk error; "
                      "base …/config.json, …/x.bin")
    # A name inside a known folder that holds a space: cut, no absolute part left.
    assert without_paths(f"at {slim}/artifacts/abc 1/w.bin") == "at …/abc 1/w.bin"
    # `…/my home2` is not the home folder (no cut in the middle of a name); it is under the
    # temporary folder (tmp_path is), cut whole, and the pattern cuts the rest up to the space.
    assert without_paths(f"at {home}2/x/y") == "at …/my home2/x/y"
