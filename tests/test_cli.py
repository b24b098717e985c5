"""The `slimserve` command's surface, without a Ray cluster: help, flags, errors as a few lines
(never a traceback), Ray Serve config files, and the demo's client side."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO
from slimserve.serve.commands import cli
from slimserve.serve.commands import local
from slimserve.serve.commands.demo import Answer, client_api_key, print_answer  # (Ray Serve LLM is imported lazily)
from slimserve.serve.commands.local import RunError, failure_summary
from slimserve.serve.commands import run_folders
from slimserve.serve.commands.run_folders import clear_stale_runs

CONFIG = """
models:
  - name: smollm2
    variants:
      - {name: baseline, weight: 70}
      - {name: int8, weight: 30, optimization: w8a8}
"""


def slimserve(*args: str, cwd=REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slimserve.serve.commands.cli", *args],
        capture_output=True, text=True, cwd=cwd, timeout=120, env={**os.environ, **(env or {})},
    )


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_help_says_what_slimserve_is_and_lists_the_commands():
    r = slimserve("--help")
    assert r.returncode == 0
    assert "optimizes a model when it loads" in r.stdout
    assert "OpenAI-compatible endpoint" in r.stdout
    for command in ("demo", "run", "config", "optimize", "ab-report", "distill"):
        assert f"\n    {command} " in r.stdout, command
    assert "slimserve run deploy/demo.yaml" in r.stdout  # Serve config files are accepted


@pytest.mark.parametrize("argv", [
    ["-v", "config", "validate", "x.yaml"],
    ["config", "validate", "x.yaml", "-v"],
    ["config", "-v", "validate", "x.yaml"],
    ["run", "x.yaml", "--verbose"],
    ["run", "-v", "x.yaml"],
    ["optimize", "x.yaml", "-v"],
    ["demo", "-v"],
])
def test_verbose_before_or_after_the_command(argv, monkeypatch):
    seen = {}
    for name in ("_validate", "_run", "_optimize", "_demo"):
        monkeypatch.setattr(cli, name, lambda args: seen.setdefault("verbose", args.verbose) and 0)
    monkeypatch.setattr(cli.logging, "basicConfig", lambda **kw: None)
    cli.main(argv)
    assert seen["verbose"] is True


def test_verbose_defaults_to_off(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_validate", lambda args: seen.setdefault("verbose", args.verbose) and 0)
    monkeypatch.setattr(cli.logging, "basicConfig", lambda **kw: None)
    cli.main(["config", "validate", "x.yaml"])
    assert seen["verbose"] is False


def test_optimize_takes_the_config_as_its_argument_and_config_flag_still_works(monkeypatch, tmp_path, capsys):
    path = write(tmp_path, "c.yaml", CONFIG)
    loaded = []
    monkeypatch.setattr(cli, "load_config_file", lambda p: loaded.append(str(p)) or _no_apps())
    assert cli.main(["optimize", str(path), "--variant", "nope"]) == 1  # no variant matched: after loading
    assert cli.main(["optimize", "--config", str(path), "--variant", "nope"]) == 1
    assert loaded == [str(path), str(path)]
    err = capsys.readouterr().err
    assert err.count("--config is deprecated") == 1
    assert cli.main(["optimize"]) == 1
    assert "which config?" in capsys.readouterr().err
    assert cli.main(["optimize", str(path), "--config", str(tmp_path / "other.yaml")]) == 1
    assert "two configs given" in capsys.readouterr().err


def _no_apps():
    return cli.ConfigFile("slimserve", [])


@pytest.mark.parametrize("argv", [
    ["run", "{missing}"],
    ["optimize", "{missing}"],
    ["config", "validate", "{missing}"],
])
def test_a_missing_config_is_one_line_not_a_traceback(tmp_path, argv):
    missing = str(tmp_path / "nope.yaml")
    r = slimserve(*[a.format(missing=missing) for a in argv])
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert f"cannot read {missing}:\n  No such file or directory" in r.stderr


def test_run_of_a_serve_config_with_several_slimserve_apps_asks_which(tmp_path):
    path = write(tmp_path, "serve.yaml", f"""
        applications:
          - name: a
            route_prefix: /a
            import_path: slimserve.serve.app:build_app
            args: {{config: {tmp_path / "c.yaml"}}}
          - name: b
            route_prefix: /b
            import_path: slimserve.serve.app:build_app
            args: {{config: {tmp_path / "c.yaml"}}}
    """)
    write(tmp_path, "c.yaml", CONFIG)
    r = slimserve("run", str(path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "has 2 slimserve applications (a, b)" in r.stderr and "--app NAME" in r.stderr
    r = slimserve("run", str(path), "--app", "c")
    assert r.returncode == 1 and "--app c:" in r.stderr and "(it has: a, b)" in r.stderr


def test_run_refuses_an_invalid_serve_config_before_starting_ray(tmp_path):
    path = write(tmp_path, "serve.yaml", """
        applications:
          - name: llm
            import_path: slimserve.serve.app:build_app
            args: {models: [{name: m, variants: [{name: a, weight: -1}]}]}
    """)
    r = slimserve("run", str(path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "applications.0[llm].args.models.0.variants.0.weight: Input should be greater than or equal to 0" in r.stderr


def test_a_failed_deploy_is_a_few_lines(monkeypatch, tmp_path, capsys):
    path = write(tmp_path, "c.yaml", CONFIG)
    tb = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
          "ValueError: tensor_parallel_size 2 does not divide 9 attention heads")
    monkeypatch.setattr(local, "local_cluster", lambda *a, **kw: contextlib.nullcontext())
    monkeypatch.setattr(local, "check_fits", lambda cfg: None)
    monkeypatch.setattr(local, "deploy", lambda *a, **kw: None)

    def failed(*a, **kw):
        raise RunError(failure_summary(f"Deploying app 'slimserve' failed with exception:\n{tb}", {"SlimServer:m--a": ""}))

    monkeypatch.setattr(local, "wait_ready", failed)
    assert cli.main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "slimserve: deployment failed:" in err
    assert "ValueError: tensor_parallel_size 2 does not divide 9 attention heads" in err
    assert len(err.strip().splitlines()) <= 4


def test_an_unexpected_error_is_one_line_and_v_shows_the_traceback(monkeypatch, tmp_path, capsys):
    path = write(tmp_path, "c.yaml", CONFIG)
    monkeypatch.setattr(local, "local_cluster", lambda *a, **kw: (_ for _ in ()).throw(Exception("The current node timed out during startup.")))
    assert cli.main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "slimserve run: Exception: The current node timed out during startup." in err and "Traceback" not in err
    with pytest.raises(Exception, match="timed out"):
        cli.main(["run", str(path), "-v"])


def test_sigterm_during_a_command_exits_143_through_the_clean_path(monkeypatch, tmp_path):
    stopped = []

    def run(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            stopped.append(True)  # a `finally` (local_cluster's teardown) runs
        return 0

    monkeypatch.setattr(cli, "_run", run)
    assert cli.main(["run", "x.yaml"]) == 143
    assert stopped == [True]
    assert signal.getsignal(signal.SIGTERM) is not cli._terminated  # restored


class _FakeStream:
    """What `client.chat.completions.with_streaming_response.create(...)` gives: headers, chunks."""

    def __init__(self, contents):
        from types import SimpleNamespace as NS

        from slimserve.serve.http.ingress import VARIANT_HEADER

        self.headers = {VARIANT_HEADER: "int8"}
        self.chunks = [NS(choices=[NS(delta=NS(content=c))]) for c in contents] + [NS(choices=[])]
        self.chat = NS(completions=NS(with_streaming_response=NS(create=lambda **kw: self)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def parse(self):
        return iter(self.chunks)


def test_demo_asks_and_times_the_first_text_chunk():
    from slimserve.serve.commands.demo import ask

    answer = ask(_FakeStream(["", None, "Paris", " is it."]), "smollm2", "?")
    assert answer.variant == "int8" and answer.parts == ["Paris", " is it."] and answer.ttft_s is not None
    empty = ask(_FakeStream(["", None]), "smollm2", "?")  # a stream that never carried text
    assert empty.ttft_s is None and empty.parts == []
    assert print_answer(empty) == 1


def test_demo_without_a_first_token_does_not_crash(capsys):
    assert print_answer(Answer(variant="int8", parts=[], ttft_s=None, total_s=1.5)) == 1
    out = capsys.readouterr()
    assert "time to first token: none" in out.out and "streamed no text" in out.err
    assert print_answer(Answer(variant="int8", parts=["Paris", "."], ttft_s=0.25, total_s=1.0)) == 0
    assert "time to first token: 250 ms" in capsys.readouterr().out


def test_demo_client_sends_one_of_the_api_keys(monkeypatch):
    from slimserve.serve.commands.demo import demo_config_path
    from slimserve.serve.config.file import load_config

    cfg = load_config(demo_config_path())
    monkeypatch.delenv(cfg.ingress.api_keys_env, raising=False)
    assert client_api_key(cfg) == "not-needed"
    monkeypatch.setenv(cfg.ingress.api_keys_env, " sk-one , sk-two")
    assert client_api_key(cfg) == "sk-one"


def test_a_run_ends_what_a_killed_run_left_behind_and_nothing_else(tmp_path, monkeypatch):
    """A process with a file open in the Ray folder of a run whose `slimserve` process is gone is
    ended; one of a live run, or of no run, stays."""
    monkeypatch.setattr(run_folders, "runs_root", lambda: tmp_path / "runs")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead_run, live_run = run_folders.run_folder(gone.pid), run_folders.run_folder(os.getpid())
    assert dead_run.name.endswith(".gone") and run_folders._run_is_live(live_run)
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    procs = {}
    for name, folder in (("orphan", dead_run), ("alive", live_run), ("unrelated", tmp_path / "elsewhere")):
        (folder / "logs").mkdir(parents=True)
        with open(folder / "logs" / "worker.out", "w") as out:  # as Ray points each process's output
            procs[name] = subprocess.Popen(sleep, stdout=out, stderr=out)
    with open(dead_run / "logs" / "worker.out") as log:  # someone reading the dead run's log
        procs["reader"] = subprocess.Popen(sleep, stdin=log)
    try:
        time.sleep(0.5)
        clear_stale_runs()
        assert procs["orphan"].wait(timeout=15) is not None
        assert all(procs[name].poll() is None for name in ("alive", "unrelated", "reader"))
        assert dead_run.exists()  # kept for its logs (the newest KEEP_RUNS are)
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_a_busy_port_is_a_clear_error_before_ray_starts():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RunError, match=f"--metrics-port.*port {port} is not free"):
            local._check_port_free("", port, "--metrics-port (Ray's Prometheus endpoint)")
