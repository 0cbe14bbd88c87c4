"""The GPU check survives its own faults (issue 27), on the CPU with small stand-in processes: a training run that
fails is restarted once with ``--cuda-graph off`` (and one that ends as planned is not); a SIGTERM to the check leaves
no child process alive and still writes the summary; a cut-off pytest still reports its counts; a failed speed case
or graph warm-up costs one row or one mode."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu")
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "speed"))  # speed.py
import gpu_check as GC  # noqa: E402
import gpu_report as GR  # noqa: E402
import paper_scale as PS  # noqa: E402
import procs as PR  # noqa: E402
import speed as SP  # noqa: E402
from test_gpu_check import check  # noqa: E402, F401  (the fixture: a GPU check on the CPU in tmp_path)

#: A bound for a hung subprocess, not a speed test: a busy 2-core machine runs these several times slower.
HANG_S = 1800


def script(path: Path, body: str) -> str:
    path.write_text(textwrap.dedent(body))
    return str(path)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_for(pred, what, timeout=HANG_S):
    t0 = time.time()
    while not pred():
        assert time.time() - t0 < timeout, f"{what} did not happen within {timeout} s"
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------- restarts (paper_scale)
FAKE_RUN = """
import json, os, sys, pathlib
argv = sys.argv[1:]
def val(flag):
    return argv[argv.index(flag) + 1] if flag in argv else None
run = pathlib.Path(val("--resume") or val("--run-dir"))
run.mkdir(parents=True, exist_ok=True)
with open(run / "argv.log", "a") as f:
    f.write(json.dumps(argv) + "\\n")
with open(run / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 3}) + "\\n")
if "--warn" in argv:
    print("warning: CUDA graph capture of the training step failed (RuntimeError: boom); training eagerly")
sys.exit(int(val("--code-off") if val("--cuda-graph") == "off" else val("--code")))
"""


@pytest.fixture
def driver(tmp_path, monkeypatch):
    monkeypatch.setattr(PS, "TRAIN", script(tmp_path / "fake_run.py", FAKE_RUN))
    args = SimpleNamespace(out=tmp_path / "out", work_dir=tmp_path / "work", dry_run=True, budget_s=300)
    return PS.Driver(args)


def _spec(d, name, code, code_off, *extra):
    argv = ["--run-dir", d.work / name, "--cuda-graph", "auto", "--code", code, "--code-off", code_off, *extra]
    return argv, lambda: False


def _argvs(d, name):
    return [json.loads(line) for line in (d.work / name / "argv.log").read_text().splitlines()]


def test_a_run_that_exits_1_is_restarted_once_with_cuda_graph_off_and_ones_that_end_as_planned_are_not(driver):
    d = driver
    (d.work / "resumable" / "checkpoints").mkdir(parents=True)
    torch.save({"step": 7}, d.work / "resumable" / "checkpoints" / "latest.pt")
    specs = {
        "crash": _spec(d, "crash", 1, 0, "--warn"),  # no checkpoint: a fresh run, the failed one moved aside
        "resumable": _spec(d, "resumable", 1, 0),  # a checkpoint: a forced resume of the same folder
        "always": _spec(d, "always", 1, 1),  # fails again: restarted once only
        "done": _spec(d, "done", 0, 9),
        "stopped": _spec(d, "stopped", 143, 9),
    }
    d.supervise(specs, deadline=time.time() + 600)
    runs = d.summary["runs"]
    assert {n: r["rc"] for n, r in runs.items()} == {"crash": 0, "resumable": 0, "always": 1, "done": 0, "stopped": 143}

    for name in ("done", "stopped"):  # not restarted
        assert "restart" not in runs[name] and len(_argvs(d, name)) == 1 and "not_restarted" not in runs[name]

    crash = runs["crash"]
    assert crash["restart"]["first"]["rc"] == 1 and crash["restart"]["first"]["step"] == 3
    assert crash["restart"]["how"].startswith("a fresh run") and "crash.failed" in crash["restart"]["how"]
    (again,) = _argvs(d, "crash")  # the new folder holds the restart only; the failed attempt was kept aside
    assert len(_argvs(d, "crash.failed")) == 1
    assert again[again.index("--cuda-graph") + 1] == "off" and again.count("--cuda-graph") == 1
    assert again[again.index("--run-dir") + 1] == str(d.work / "crash") and "--resume" not in again
    assert "CUDA graph capture of the training step failed" in crash["capture_fallback"]
    assert (d.work / "logs" / "crash.restart.log").exists()

    first, again = _argvs(d, "resumable")
    assert first[first.index("--cuda-graph") + 1] == "auto"
    assert again[again.index("--resume") + 1] == str(d.work / "resumable") and "--force-config" in again
    assert "--run-dir" not in again and again[again.index("--cuda-graph") + 1] == "off"
    assert runs["resumable"]["restart"]["how"] == "forced resume from its checkpoint at step 7"
    assert runs["resumable"]["capture_fallback"] is None

    assert len(_argvs(d, "always.failed")) == len(_argvs(d, "always")) == 1  # one restart, then no more
    assert runs["always"]["restart"]["first"]["rc"] == 1 and "not_restarted" not in runs["always"]

    md = GR.render_markdown({"parts": {"paper_scale": {"status": "ok", "result": d.summary}}})
    assert "| crash | None (ran to the end); capture fallback; restarted |" in md
    assert "- crash: the CUDA graph capture failed and the run trained eagerly: `warning: CUDA graph capture" in md
    assert "- resumable: exited with code 1 after" in md and "at step 3; restarted once with `--cuda-graph off`: " in md
    assert "forced resume from its checkpoint at step 7" in md


def test_no_restart_when_the_window_is_nearly_over_or_the_driver_is_stopping(driver):
    d = driver
    d.supervise({"late": _spec(d, "late", 1, 0)}, deadline=time.time() + PS.RESTART_MIN_S / 2)
    assert d.summary["runs"]["late"]["not_restarted"].startswith(f"less than {PS.RESTART_MIN_S} s")
    d.stopping = "stopped by SIGTERM"
    d.supervise({"stopping": _spec(d, "stopping", 1, 0)}, deadline=time.time() + 600)
    assert d.summary["runs"]["stopping"]["not_restarted"] == "the driver was being stopped"
    assert len(_argvs(d, "late")) == len(_argvs(d, "stopping")) == 1


def test_the_checkpoint_by_wall_time_is_passed_only_when_the_training_command_has_it():
    assert PS.checkpoint_seconds_flags({"--checkpoint-seconds", "--seed"}) == ["--checkpoint-seconds", 60]
    assert PS.checkpoint_seconds_flags({"--seed"}) == []  # an unknown flag would make every run exit with 2
    assert PS.CHECKPOINT_S == 60


def test_cuda_graph_passes_through_both_drivers(capsys):
    assert GC.parse_args(["--out", "x", "--cuda-graph", "off"]).cuda_graph == "off"
    assert GC.parse_args(["--out", "x"]).cuda_graph == PS.parse_args(["--out", "x"]).cuda_graph == "auto"
    assert PS.parse_args(["--out", "x", "--cuda-graph", "on"]).cuda_graph == "on"
    with pytest.raises(SystemExit):
        GC.parse_args(["--out", "x", "--cuda-graph", "maybe"])
    assert "invalid choice: 'maybe'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- pytest cut off
CUT_TESTS = """
import os, signal, time
import pytest

@pytest.mark.cuda
def test_a_passes():
    pass

@pytest.mark.cuda
def test_b_hangs():
    if os.environ.get("IGNORE_SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(os.environ["HANG_FLAG"] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.environ["HANG_FLAG"] + ".tmp", os.environ["HANG_FLAG"])
    time.sleep(600)
"""


@pytest.mark.parametrize("ignores_sigint", [False, True], ids=["report-on-sigint", "no-report"])
def test_a_cut_off_pytest_still_reports_its_counts(check, tmp_path, monkeypatch, ignores_sigint):  # noqa: F811
    """Stopped as a SIGTERM to the check stops it: SIGINT first (pytest writes its report); a pytest that does not
    stop on SIGINT gets SIGTERM and writes none, and the counts come from its -v log."""
    monkeypatch.setattr(PR, "INT_GRACE_S", 2)
    monkeypatch.setattr(PR, "GRACE_S", 5)
    monkeypatch.setattr(GC, "CUDA_TEST_FILES", [script(tmp_path / "test_cut.py", CUT_TESTS)])
    flag = tmp_path / "hanging"
    monkeypatch.setenv("HANG_FLAG", str(flag))
    if ignores_sigint:
        monkeypatch.setenv("IGNORE_SIGINT", "1")

    def stop_when_hanging():
        wait_for(flag.exists, "the hanging test")
        check.on_signal(signal.SIGTERM, None)

    stopper = threading.Thread(target=stop_when_hanging, daemon=True)
    stopper.start()
    GC.cuda_tests(check, gpu_ok=True, limit_s=HANG_S)
    res = check.summary["parts"]["cuda_tests"]
    assert res["passed"] == 1 and res["failures"] == 0 and res["status"].startswith("failed: stopped")
    assert res.get("from_log", False) == ignores_sigint
    if ignores_sigint:
        assert res["rc"] == -signal.SIGTERM and res["cut_off_in"].endswith("test_cut.py::test_b_hangs")
        md = (check.out / "summary.md").read_text()
        assert "(counted from the log: no report was written); cut off in " in md


def test_counts_from_a_pytest_log_that_ends_mid_test():
    lines = [
        "tests/t.py::test_a PASSED                [ 20%]",
        "tests/t.py::test_b[x-1] FAILED           [ 40%]",
        "tests/t.py::test_c SKIPPED (no CUDA)     [ 60%]",
        "tests/t.py::test_d ERROR                 [ 80%]",
        "FAILED tests/t.py::test_b[x-1] - AssertionError: one is not two",
        "tests/t.py::test_e ",
    ]
    res = GR.pytest_log_results(lines)
    assert {k: res[k] for k in ("tests", "passed", "failures", "skipped", "errors")} == {
        "tests": 4, "passed": 1, "failures": 1, "skipped": 1, "errors": 1,
    }  # fmt: skip
    assert res["failed_tests"] == ["test_b[x-1]: AssertionError: one is not two", "test_d"]
    assert res["cut_off_in"] == "tests/t.py::test_e"


def test_the_per_test_timeout_is_passed_only_when_the_plugin_is_importable(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: real(n, *a) if n != "pytest_timeout" else None)
    argv = GC.pytest_argv(tmp_path / "r.xml")
    assert "--timeout" not in argv and "-v" in argv
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "pytest_timeout" else real(n, *a))
    argv = GC.pytest_argv(tmp_path / "r.xml")
    assert argv[argv.index("--timeout") + 1] == str(GC.PER_TEST_S)


# ------------------------------------------------------------------------------------------- SIGTERM to the check
FAKE_ENV = 'print(\'ENV {"python": "3", "cuda_available": false}\')\n'
SLEEPER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
open(os.path.join(sys.argv[1], "grandchild.tmp"), "w").write(str(os.getpid()))
os.replace(os.path.join(sys.argv[1], "grandchild.tmp"), os.path.join(sys.argv[1], "grandchild"))
time.sleep(600)
"""
FAKE_PAPER = """
import os, sys, time
sys.path.insert(0, {bench!r})
import procs

class Owner:
    work, dry_run, sampler = {work!r}, True, None

pids = os.environ["FAKE_PIDS"]
open(os.path.join(pids, "argv"), "w").write(" ".join(sys.argv[1:]))
procs.Part(Owner, "grandchild", {sleeper!r}, [pids], 600)  # a run in its own session, as the real driver starts
open(os.path.join(pids, "paper.tmp"), "w").write(str(os.getpid()))
os.replace(os.path.join(pids, "paper.tmp"), os.path.join(pids, "paper"))
time.sleep(600)  # SIGTERM ends this process at once, leaving the run: only the check's sweep can stop it
"""
WRAPPER = """
import sys
sys.path.insert(0, {bench!r})
import gpu_check as GC
GC.TARGETS.update(environment={env!r}, paper_scale={paper!r})
GC.CUDA_TEST_FILES = [{tests!r}]
sys.exit(GC.run_check(GC.parse_args(sys.argv[1:])))
"""


def test_a_sigterm_to_the_check_leaves_no_child_alive_and_still_writes_the_summary(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    fmt = {"bench": os.path.abspath(BENCH), "work": str(tmp_path / "paper_work")}
    fmt["sleeper"] = script(tmp_path / "sleeper.py", SLEEPER)
    fmt.update(env=script(tmp_path / "env.py", FAKE_ENV), paper=script(tmp_path / "paper.py", FAKE_PAPER.format(**fmt)))
    fmt["tests"] = script(tmp_path / "test_cut.py", CUT_TESTS)
    wrapper = script(tmp_path / "wrapper.py", WRAPPER.format(**fmt))
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--dry-run", "--out", out, "--work-dir", work, "--parts", "paper_scale,cuda_tests", "--budget-s", 900]
    env = {**os.environ, "FAKE_PIDS": str(pids), "HANG_FLAG": str(pids / "hanging"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, wrapper, *map(str, argv)], env=env, stdout=subprocess.PIPE, text=True)
    names, children = ("paper", "grandchild", "hanging"), {}
    try:
        wait_for(lambda: all((pids / n).exists() for n in names), "every child's start")
        children = {n: int((pids / n).read_text()) for n in names}  # "hanging": the pytest process
        assert all(alive(p) for p in children.values()), children
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=HANG_S)
    finally:
        proc.kill()
        left = [p for p in children.values() if alive(p)]
        for p in left:  # never leave this test's processes behind, even when it fails
            os.kill(p, signal.SIGKILL)
    assert proc.returncode == 143, stdout[-3000:]
    wait_for(lambda: not any(alive(p) for p in children.values()), "the children's end", timeout=10)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"].startswith("stopped by SIGTERM") and summary["all_ok"] is False
    assert summary["leftover_groups"] == [children["grandchild"]]  # the fake driver left its run: the sweep stopped it
    assert summary["parts"]["cuda_tests"]["passed"] == 1  # pytest got SIGINT and wrote its report
    assert summary["parts"]["paper_scale"]["signal"] == "stopped: the GPU check got SIGTERM"
    assert "--cuda-graph auto" in (pids / "argv").read_text()
    md = (out / "summary.md").read_text()
    assert "**stopped by SIGTERM" in md and "Process groups still running at the end, stopped" in md
    assert (out / "results.tar.gz").exists()


# ------------------------------------------------------------------------------------------- speed.py
def test_a_failed_speed_case_costs_its_row_and_the_others_still_run(tmp_path):
    def measure(kind, preset, batch, device, args):
        if preset == "bad":
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        return {"model": kind, "preset": preset, "batch": batch, "modes": {"hand": {"img_s": 1.0}}}

    args = SimpleNamespace(json=str(tmp_path / "speed.json"))
    cases = [("vlae", "ok", 4), ("vlae", "bad", 4), ("hvae", "ok", 4)]
    rows = SP.run_cases(cases, torch.device("cpu"), args, {"machine": "m"}, measure=measure)
    assert [("error" in r) for r in rows] == [False, True, False]
    assert rows[1]["error"] == "RuntimeError: CUDA error: operation failed due to a previous error during capture"
    assert json.loads((tmp_path / "speed.json").read_text())["rows"] == rows
    assert GR.speed_table(rows)[-1].startswith("- vlae bad 4: the case failed: RuntimeError: CUDA error")


def test_on_cuda_the_cases_after_a_fault_run_in_a_fresh_process(monkeypatch):
    calls = []
    monkeypatch.setattr(SP, "in_fresh_process", lambda rest, args, head, rows: calls.append(rest) or rows + ["later"])
    graph_failed = {"model": "vlae", "preset": "a", "batch": 1, "modes": {"graph": {"skipped": "capture failed: x"}}}
    rows = SP.run_cases([("vlae", "a", 1), ("hvae", "a", 1), ("vlae", "b", 1)], SimpleNamespace(type="cuda"),
                        SimpleNamespace(json=None), {}, measure=lambda *a: graph_failed)  # fmt: skip
    assert calls == [[("hvae", "a", 1), ("vlae", "b", 1)]] and rows == [graph_failed, "later"]
    assert not SP.suspect({"modes": {"graph": {"skipped": "needs CUDA"}, "hand": {"img_s": 1.0}}})


def test_a_fault_in_the_graph_warm_up_costs_the_graph_mode_only(monkeypatch):
    class Step:
        def __init__(self, graph):
            self.graph_mode, self.graph = graph, None

        def step(self, x, kl_scale):
            if self.graph_mode:
                raise RuntimeError("Offset increment outside graph capture encountered unexpectedly.")

    fake = SimpleNamespace(make_step=lambda *a, graph, **k: Step(graph))
    monkeypatch.setattr(SP, "step_module", lambda: (fake, None))
    svi = SimpleNamespace(optim=None, step=lambda *a, **k: 0.0)
    nets = (torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), svi, torch.zeros(1, 2), 1e-3)
    variants, why_not = SP.build_modes(*nets, SimpleNamespace(type="cuda"))
    assert sorted(variants) == ["hand", "safe", "svi"]
    assert why_not == {"graph": "warm-up failed: RuntimeError: Offset increment outside graph capture encountered "
                                "unexpectedly."}  # fmt: skip
    _, why_not = SP.build_modes(*nets, SimpleNamespace(type="cuda"), graph_on=False)
    assert why_not == {"graph": "left out (--no-graph)"}


@pytest.mark.slow
def test_the_fresh_process_runs_the_remaining_cases_and_keeps_the_earlier_rows(tmp_path):
    """speed.py --rows/--append for real, on the CPU: a good case, then one that fails (an unknown preset)."""
    path = tmp_path / "speed.json"
    args = SP.parse_args(["--cases", "mnist-cpu:4", "--steps", "1", "--repeats", "1", "--threads", "1", "--no-side",
                          "--json", str(path)])  # fmt: skip
    earlier = [{"model": "vlae", "preset": "earlier", "batch": 4, "modes": {}, "error": "x"}]
    rows = SP.in_fresh_process([("vlae", "mnist-cpu", 4), ("hvae", "no-such-preset", 4)], args, {"m": 1}, earlier)
    assert [r["preset"] for r in rows] == ["earlier", "mnist-cpu", "no-such-preset"]
    assert "img_s" in rows[1]["modes"]["hand"] and "no-such-preset" in rows[2]["error"]
    assert json.loads(path.read_text())["rows"] == rows


# ------------------------------------------------------------------------------------------- the real training command
@pytest.mark.slow
def test_the_forced_resume_that_restarts_a_failed_run_trains_on_from_its_checkpoint(tmp_path):
    """restart_argv's resume, run by the real training command on a run that left a checkpoint."""
    run = tmp_path / "run"
    argv = ["--model", "vlae", "--dataset", "synthetic", "--preset", "tiny", "--fade-in", 0, "--num-steps", 6,
            "--run-dir", run, "--cuda-graph", "auto", "--log-every", 2, "--checkpoint-every", 3, "--no-figures",
            "--no-eval", "--no-progress", "--data-dir", tmp_path / "data"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-m", "pyro_vlae.run", *map(str, argv)], env=env, capture_output=True,
                           text=True, timeout=HANG_S)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    again, how = PR.restart_argv([*argv[:9], 10, *argv[10:]], run)  # asks for 10 steps: the resume trains 4 more
    assert how == "forced resume from its checkpoint at step 6"
    proc = subprocess.run([sys.executable, "-m", "pyro_vlae.run", *map(str, again)], env=env, capture_output=True,
                          text=True, timeout=HANG_S)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert PR.checkpoint_step(run) == 10
    assert json.loads((run / "config.json").read_text())["train"]["cuda_graph"] == "off"


@pytest.mark.slow
def test_the_dry_run_with_cuda_graph_on_restarts_every_run_eagerly_and_packs_them(tmp_path):
    """``--cuda-graph on`` on a CPU makes every real run exit with 2 at once; each is restarted with off, trains, is
    stopped at the deadline and packed, and the summary says so."""
    work = tmp_path / "work"
    cmd = [sys.executable, os.path.join(BENCH, "paper_scale.py"), "--dry-run", "--budget-s", "240", "--cuda-graph",
           "on", "--out", str(tmp_path / "out"), "--work-dir", str(work)]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=HANG_S)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "paper_scale.json").read_text())
    for name, run in summary["runs"].items():
        assert run["restart"]["first"]["rc"] == 2 and run["restart"]["how"].startswith("a fresh run"), (name, run)
        assert run["rc"] == 143 and run["status"] == "ok" and run["step"] > 0, (name, run)
    assert len(summary["pack"]["runs"]) == 4
