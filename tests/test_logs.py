"""Quiet output: scoped dependency filters, the progress bar in each of its places, and
the capture that sends a pipeline step's full output to its log and its events on."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings

import pytest

from mar3d import logs


@pytest.fixture
def quiet(monkeypatch):
    """Not verbose, not inside a pipeline step; the env that quiet_dependencies sets is
    restored afterwards."""
    for key in (logs.VERBOSE_ENV, logs.EVENTS_ENV, *logs.QUIET_ENV):
        monkeypatch.delenv(key, raising=False)


def _shown(category, module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs.quiet_dependencies()  # in front of "always", as in a command
        warnings.warn_explicit("w", category, f"{module.rsplit('.', 1)[-1]}.py", 1, module=module)
    return bool(caught)


def test_warning_filters_are_scoped_to_category_and_module(quiet):
    assert not _shown(FutureWarning, "torch.distributed.c10d_logger")
    assert not _shown(UserWarning, "kfp.local.orchestrator.task_executor")
    # The same category from any other module, or another category from that module, shows.
    assert _shown(FutureWarning, "mar3d.train.loop")
    assert _shown(FutureWarning, "torch.nn.modules.module")
    assert _shown(DeprecationWarning, "torch.distributed.c10d_logger")
    assert _shown(UserWarning, "kfp.dsl.pipeline_context")


def test_logger_levels_are_scoped_to_named_loggers(quiet):
    root_level = logging.getLogger().level
    logs.quiet_dependencies()
    assert not logging.getLogger("ray.data._internal.execution.streaming_executor").isEnabledFor(logging.INFO)
    assert logging.getLogger("ray.data._internal.execution.streaming_executor").isEnabledFor(logging.WARNING)
    assert logging.getLogger().level == root_level
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"


def test_verbose_filters_nothing(quiet, monkeypatch):
    monkeypatch.setenv(logs.VERBOSE_ENV, "1")
    with warnings.catch_warnings():
        before = list(warnings.filters)
        logs.quiet_dependencies()
        assert warnings.filters == before
    assert "RAY_DATA_DISABLE_PROGRESS_BARS" not in os.environ


def test_line_bar_writes_a_line_per_third():
    out = io.StringIO()
    bar = logs._LineBar(9, "meshes", "mesh", stream=out, min_seconds=0)
    for _ in range(9):
        bar.update(1)
        bar.set_postfix(failed=0)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["  meshes: 3/9 mesh (33%)", "  meshes: 6/9 mesh (66%)"]
    assert all("failed=0" in line for line in lines)


def test_line_bar_writes_at_most_a_line_per_interval():
    out = io.StringIO()
    bar = logs._LineBar(9, "meshes", "mesh", stream=out, min_seconds=60)
    for _ in range(9):
        bar.update(1)
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == ["  meshes: 3/9 mesh (33%)"]


def test_progress_bar_in_a_pipeline_step_sends_events(quiet, monkeypatch, capsys):
    monkeypatch.setenv(logs.EVENTS_ENV, "1")
    bar = logs.progress_bar(3, "train vae", "step")
    for _ in range(3):
        bar.update(1)
    bar.set_postfix(loss=0.123456)
    bar.close()
    events = [logs.parse_event(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1] == {"kind": "progress", "desc": "train vae", "n": 3, "total": 3,
                          "unit": "step", "postfix": {"loss": "0.1235"}}


def test_progress_bar_off_a_terminal_is_lines(quiet, capsys):
    bar = logs.progress_bar(4, "generate", "shape")
    assert isinstance(bar, logs._LineBar)  # stderr is not a terminal under pytest
    assert isinstance(logs.progress_bar(4, "generate", "shape", enabled=False), logs._NoBar)


def test_router_finds_events_in_forwarded_worker_lines_and_keeps_the_rest():
    log, seen = io.StringIO(), []
    router = logs.LineRouter(log, on_event=lambda event, line: seen.append(event),
                             keep_prefix="RESULT: ")
    event = {"kind": "progress", "desc": "train lr", "n": 5, "total": 30}
    router.write("\x1b[36m(RayTrainWorker pid=12)\x1b[0m " + logs.EVENT_MARKER + json.dumps(event) + "\n")
    router.write("a warning\nRESULT: {}\npart")
    router.write("ial line\n")
    assert seen == [event]
    assert router.kept == "RESULT: {}"
    assert list(router.tail) == ["a warning", "partial line"]
    assert "a warning" in log.getvalue() and logs.EVENT_MARKER in log.getvalue()
    router.close("the end\n")
    router.write("after the step\n")  # from processes the step left running: dropped
    assert log.closed


def test_event_view_draws_steps_and_a_few_progress_lines():
    out = io.StringIO()
    view = logs.EventView(out)
    view.show({"kind": "step", "state": "start", "step": "train vae", "log": "/w/step.log"})
    for n in range(1, 61):
        view.show({"kind": "progress", "desc": "train vae", "n": n, "total": 60, "unit": "step"})
    view.show({"kind": "step", "state": "done", "step": "train vae", "seconds": 95.2,
               "summary": "60 steps, final loss 0.31"})
    view.show({"kind": "step", "state": "failed", "step": "evaluate", "seconds": 3,
               "log": "/w/eval/step.log"})
    lines = out.getvalue().splitlines()
    assert lines[0] == "train vae: started, log: /w/step.log"
    assert lines[-2] == "train vae: done in 95 s: 60 steps, final loss 0.31"
    assert lines[-1] == "evaluate: FAILED after 3 s; its full log: /w/eval/step.log"
    assert len(lines) <= 2 + 2 + 1  # at most a line per third (and at most one per 5 s)


def test_captured_output_takes_python_c_level_and_child_process_output(capfd):
    chunks = []
    with logs.console_stream() as console:
        with logs.captured_output(chunks.append):
            print("from python", flush=True)
            os.write(2, b"from fd 2\n")
            subprocess.run([sys.executable, "-c", "print('from a child')"], check=True)
            console.write("still on the console\n")
    print("after", flush=True)
    text = "".join(chunks)
    assert "from python" in text and "from fd 2" in text and "from a child" in text
    out = capfd.readouterr().out
    assert "still on the console" in out and "after" in out and "from python" not in out


def test_root_records_are_dropped_only_for_the_named_package():
    keep = logs.DropRootInfo("kfp")

    def record(name, level, path):
        return logging.LogRecord(name, level, path, 1, "m", None, None)

    assert not keep.filter(record("root", logging.INFO, "/venv/site-packages/kfp/local/pipeline_orchestrator.py"))
    assert keep.filter(record("root", logging.ERROR, "/venv/site-packages/kfp/local/pipeline_orchestrator.py"))
    assert keep.filter(record("root", logging.INFO, "/repo/pipelines/orchestrate.py"))
    assert keep.filter(record("kfp.x", logging.INFO, "/venv/site-packages/kfp/local/x.py"))


def _events(text: str) -> list[dict]:
    return [e for e in map(logs.parse_event, text.splitlines()) if e is not None]


def test_a_pipeline_step_logs_everything_and_shows_its_events(quiet, monkeypatch, tmp_path, capfd):
    from components._run import run_step

    monkeypatch.setenv(logs.STEP_LOGS_ENV, "1")
    result = run_step(["mar3d", "config", "show", "data"], "", log_dir=str(tmp_path / "show"))
    assert result["config"]["render_up_axis"] == "y"
    out = capfd.readouterr().out
    assert [(e["state"], e["step"]) for e in _events(out)] == [("start", "config show"),
                                                              ("done", "config show")]
    assert "render_up_axis" not in out  # the command's own output is in its log
    log = (tmp_path / "show" / "step.log").read_text()
    assert "running: mar3d config show data" in log and "render_up_axis: y" in log


def test_a_failed_step_names_its_log_and_ends_with_its_last_lines(quiet, monkeypatch, tmp_path, capfd):
    from components._run import StepFailed, run_step

    monkeypatch.setenv(logs.STEP_LOGS_ENV, "1")
    monkeypatch.delenv("MAR3D_STEP_FAILURES", raising=False)
    with pytest.raises(StepFailed) as info:
        run_step(["mar3d", "config", "show", "data", "--set", "no_such_key=1"], "",
                 log_dir=str(tmp_path / "show"))
    log = tmp_path / "show" / "step.log"
    message = str(info.value)
    assert "exited with status 2" in message and f"full log: {log}" in message
    assert "unknown key(s) ['no_such_key']" in message  # the command's error, from the tail
    assert "unknown key(s) ['no_such_key']" in log.read_text()
    assert _events(capfd.readouterr().out)[-1]["state"] == "failed"


def test_without_step_logs_a_step_prints_everything_as_before(quiet, monkeypatch, tmp_path, capfd):
    from components._run import run_step

    monkeypatch.delenv(logs.STEP_LOGS_ENV, raising=False)
    run_step(["mar3d", "config", "show", "data"], "", log_dir=str(tmp_path / "show"))
    out = capfd.readouterr().out
    assert "render_up_axis: y" in out and not _events(out)
    assert not (tmp_path / "show").exists()
