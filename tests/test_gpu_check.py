"""``benchmarks/gpu_check.py``: its parts one by one (fast), and its whole ``--dry-run`` on the CPU (slow)."""

import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCH)
import gpu_check as GC  # noqa: E402
import gpu_report as GR  # noqa: E402

# What the GPU machine returns from its output folder: at most 8 files, 16 MiB each, plain names.
MAX_FILES, MAX_BYTES, NAME = 8, 16 * 2**20, re.compile(r"^[A-Za-z0-9._-]+$")


@pytest.fixture
def check(tmp_path):
    args = SimpleNamespace(dry_run=True, budget_s=60, out=tmp_path / "out", work_dir=tmp_path / "work", data_dir=None)
    c = GC.Check(args)
    yield c
    c.sampler.done.set()


def child(tmp_path, body: str) -> str:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_a_part_runs_its_target_with_its_arguments_and_logs_it(check, tmp_path):
    target = child(tmp_path, "import sys\nprint('args', sys.argv[1:])\nsys.exit(3)\n")
    res = GC.Part(check, "echo", target, ["a", 7], timeout_s=30).wait()
    assert res["rc"] == 3 and "signal" not in res and "peak_gpu" not in res
    assert "args ['a', '7']" in (check.work / "logs" / "echo.log").read_text()


def test_stop_sends_sigterm_and_a_training_run_exits_with_its_checkpoint_code(check, tmp_path):
    target = child(
        tmp_path,
        """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: (print("checkpoint written"), sys.exit(143)))
        open(sys.argv[1], "w").close()
        time.sleep(60)
        """,
    )
    flag = tmp_path / "started"
    t0 = time.time()
    res = GC.Part(check, "train", target, [flag], timeout_s=60, stop=flag.exists).wait()
    assert res["rc"] == 143 and res["signal"] == "stopped by SIGTERM as planned" and time.time() - t0 < 30
    assert "checkpoint written" in (check.work / "logs" / "train.log").read_text()


def test_a_hung_part_is_killed_after_its_timeout_and_the_grace_period(check, tmp_path, monkeypatch):
    monkeypatch.setattr(GC, "GRACE_S", 1)
    target = child(tmp_path, "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n")
    t0 = time.time()
    res = GC.Part(check, "hang", target, [], timeout_s=1).wait()
    assert res["rc"] == -9 and res["signal"].startswith("timed out after 1 s") and time.time() - t0 < 20


def test_cuda_test_counts_come_from_pytest_junit_report(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\ndef test_a(): pass\ndef test_b(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no CUDA device')\ndef test_c(): pass\n"
    )
    xml = tmp_path / "r.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path), "--junitxml", str(xml)]
    subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=120)
    res = GR.cuda_test_results(xml)
    assert (res["tests"], res["passed"], res["failures"], res["skipped"], res["errors"]) == (3, 1, 1, 1, 0)
    assert len(res["failed_tests"]) == 1 and res["failed_tests"][0].startswith("test_b: AssertionError: one is not two")


def test_the_step_rate_is_the_vlae_row_at_the_default_jobs_preset_and_batch(tmp_path):
    rows = [
        {"model": "hvae", "preset": "mnist", "batch": 100, "pyro_img_s": 900.0},
        {"model": "vlae", "preset": "mnist", "batch": 1000, "pyro_img_s": 20000.0},
        {"model": "vlae", "preset": "mnist", "batch": 100, "pyro_img_s": 5000.0},
    ]
    (tmp_path / "speed.json").write_text(json.dumps({"rows": rows}))
    assert GR.speed_rate(tmp_path / "speed.json", dry_run=False) == 50.0
    assert GR.speed_rate(tmp_path / "missing.json", dry_run=False) is None


def test_the_output_folder_holds_what_the_gpu_machine_returns(check):
    run = check.work / "default"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.pt").write_bytes(b"weights")
    (run / "metrics.jsonl").write_text('{"step": 5}\n')
    (run / "figures").mkdir()
    (run / "figures" / "interventions.png").write_bytes(b"png")
    assert check.keep_figure(run, "default_interventions.png") == "default_interventions.png"
    row = {"model": "vlae", "preset": "mnist", "batch": 100, "pyro_img_s": 700.0, "hand_img_s": 1000.0,
           "pyro_over_hand": 0.7, "loss_diff": 0.01, "rel_grad_diff": 1e-7, "generation_img_s": 1e4, "iwae_img_s": 3.0,
           "iwae_k": 1000}  # fmt: skip
    check.record("speed", {"status": "ok", "seconds": 3, "rows": [row]})
    files = sorted(p.name for p in check.out.iterdir())
    assert files == ["default_interventions.png", "gpu_check.log", "results.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(check.out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu_check/default/metrics.jsonl" in names and not any(n.endswith(".pt") for n in names)
    md = (check.out / "summary.md").read_text()
    assert "| speed | ok | 3 |" in md and "| 0.700 (below 0.8) | 1.0e-02 / 1.0e-07 |" in md
    assert json.loads((check.out / "summary.json").read_text())["parts"]["speed"]["rows"] == [row]


def test_unknown_parts_are_refused(capsys):
    with pytest.raises(SystemExit):
        GC.parse_args(["--out", "x", "--parts", "speed,warp"])
    assert "unknown part(s) ['warp']" in capsys.readouterr().err


@pytest.mark.slow
def test_the_dry_run_runs_every_part_on_the_cpu(tmp_path):
    """The whole check with tiny sizes (about 2 CPU-minutes); every part must report ok, the CUDA tests 'skipped: no
    CUDA' (or ok on a GPU machine), and the output folder must hold only what the GPU machine returns."""
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(BENCH, "gpu_check.py"), "--dry-run", "--out", str(out)]
    cmd += ["--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    want = {"environment", "speed", "cuda_tests", "default_job", "paper", "hierarchy_probe", "paper_figures"}
    assert set(summary["parts"]) == want and summary["all_ok"]
    for name, part in summary["parts"].items():
        expected = "skipped: no CUDA" if name == "cuda_tests" and not torch.cuda.is_available() else "ok"
        assert part["status"] == expected, (name, part)
    assert summary["parts"]["paper"]["signal"] == "stopped by SIGTERM as planned"
    assert set(summary["parts"]["hierarchy_probe"]["probe"]["class_change"]) == {"z1", "z2", "z3"}
    assert summary["parts"]["default_job"]["eval"]["evaluation"]["test"]["likelihood"]["num_samples"] == 10
    files = list(out.iterdir())
    assert len(files) <= MAX_FILES and all(NAME.match(p.name) and p.stat().st_size < MAX_BYTES for p in files)
    assert {"summary.json", "summary.md", "results.tar.gz", "default_interventions.png"} <= {p.name for p in files}


@pytest.mark.slow
def test_without_a_gpu_the_real_check_stops_with_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cmd = [sys.executable, os.path.join(BENCH, "gpu_check.py"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd + ["--work-dir", str(tmp_path / "w")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: no CUDA device is visible")
    assert "no CUDA device" in json.loads((tmp_path / "out" / "summary.json").read_text())["error"]


def test_a_failing_stop_callback_leaves_the_timeout_and_kill_in_force(check, tmp_path, monkeypatch):
    """A stop check that raises (e.g. on a half-written metrics line) must not end the watcher."""
    monkeypatch.setattr(GC, "GRACE_S", 1)
    target = child(tmp_path, "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n")
    res = GC.Part(check, "hang", target, [], timeout_s=2, stop=lambda: json.loads('{"step": 1')).wait()
    assert res["rc"] == -9 and res["signal"].startswith("timed out") and res["stop_error"].startswith("JSONDecodeError")


def test_the_step_count_of_a_run_still_writing_ignores_its_cut_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n{"step": 20}\n{"step": 3')
    assert GR.metrics_steps(tmp_path) == 20
    assert GR.metrics_steps(tmp_path / "missing") == 0
