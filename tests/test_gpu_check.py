"""``benchmarks/gpu/gpu_check.py``: its parts one by one (fast), and its whole ``--dry-run`` on the CPU (slow)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
from types import SimpleNamespace

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu")
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "speed"))  # harness.py
import gpu_check as GC  # noqa: E402
import gpu_report as GR  # noqa: E402
import harness as H  # noqa: E402
import model_pack as MP  # noqa: E402
import procs as PR  # noqa: E402

#: A bound for a hung subprocess, not a speed test: a busy 2-core machine runs these several times slower.
HANG_S = 1800

# What the GPU machine returns from its output folder: at most 8 files, 16 MiB each, plain names.
MAX_FILES, MAX_BYTES, NAME = 8, 16 * 2**20, re.compile(r"^[A-Za-z0-9._-]+$")
KINDS = ("vlae", "hvae")


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


@contextlib.contextmanager
def sigterm_ignored_from_exec():
    """Children started inside ignore SIGTERM from their first instruction (an ignored signal stays ignored across
    fork and exec), so a SIGTERM that a loaded machine lets arrive before the child's own ``signal.signal`` call
    cannot kill it with -15 instead of the SIGKILL under test."""
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_part_runs_its_target_with_its_arguments_and_logs_it(check, tmp_path):
    target = child(tmp_path, "import sys\nprint('args', sys.argv[1:])\nsys.exit(3)\n")
    res = PR.Part(check, "echo", target, ["a", 7], timeout_s=30).wait()
    assert res["rc"] == 3 and "signal" not in res and "peak_gpu" not in res
    assert "args ['a', '7']" in (check.work / "logs" / "echo.log").read_text()


def test_stop_sends_sigterm_and_a_training_run_exits_with_its_checkpoint_code(check, tmp_path):
    target = child(
        tmp_path,
        """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: (print("checkpoint written"), sys.exit(143)))
        open(sys.argv[1], "w").close()
        time.sleep(600)
        """,
    )
    flag = tmp_path / "started"
    res = PR.Part(check, "train", target, [flag], timeout_s=600, stop=flag.exists).wait()
    assert res["rc"] == 143 and res["signal"] == "stopped by SIGTERM as planned"  # the sleep alone would give 0
    assert "checkpoint written" in (check.work / "logs" / "train.log").read_text()


def test_a_hung_part_is_killed_after_its_timeout_and_the_grace_period(check, tmp_path, monkeypatch):
    monkeypatch.setattr(PR, "GRACE_S", 1)
    target = child(tmp_path, "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)\n")
    with sigterm_ignored_from_exec():
        part = PR.Part(check, "hang", target, [], timeout_s=1)
    res = part.wait()
    assert res["rc"] == -9 and res["signal"].startswith("timed out after 1 s")  # the sleep alone would give 0


def test_cuda_test_counts_come_from_pytest_junit_report(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\ndef test_a(): pass\ndef test_b(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no CUDA device')\ndef test_c(): pass\n"
    )
    xml = tmp_path / "r.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path), "--junitxml", str(xml)]
    subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=HANG_S)
    res = GR.cuda_test_results(xml)
    assert (res["tests"], res["passed"], res["failures"], res["skipped"], res["errors"]) == (3, 1, 1, 1, 0)
    assert len(res["failed_tests"]) == 1 and res["failed_tests"][0].startswith("test_b: AssertionError: one is not two")


ROW = {
    "model": "vlae", "preset": "mnist", "batch": 100, "limit_steps_s": 1000.0, "loss": 1.0, "loss_diff": 0.0,
    "rel_grad_diff": 0.0, "gflop_per_step": 1.0,
    "modes": {
        "hand": {"img_s": 50_000.0, "steps_s": 500.0, "kernel_ms": 1.0, "busy": 0.5},
        "svi": {"img_s": 6_000.0, "steps_s": 60.0, "kernel_ms": 1.2, "busy": 0.072},
        "safe": {"img_s": 48_000.0, "steps_s": 480.0, "kernel_ms": 1.1, "busy": 0.528},
        "graph": {"error": "RuntimeError: capture"},
    },
}  # fmt: skip


def test_the_speed_table_shows_each_mode_the_ratios_and_what_failed():
    lines = GR.speed_table([ROW])
    assert lines[2] == (
        "| vlae | mnist | 100 | 50000 | 6000 | 48000 | failed | failed | - | 0.96 | 7% / 53% / failed | 1.00 | 1000 |"
    )
    assert lines[-1] == "- vlae mnist 100: graph: RuntimeError: capture"


def test_kernel_time_sums_only_the_events_on_the_cuda_device():
    ev = lambda dev, us: SimpleNamespace(device_type=dev, time_range=SimpleNamespace(elapsed_us=lambda: us))  # noqa: E731
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    assert H.device_time_us([ev(cuda, 30), ev(cpu, 1000), ev(cuda, 12)]) == 42
    assert H.kernel_ms(lambda: None, torch.device("cpu")) is None


def test_the_output_folder_holds_what_the_gpu_machine_returns(check):
    run = check.work / "paper_scale" / "shapes3d_vlae"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.pt").write_bytes(b"weights")
    (run / "metrics.jsonl").write_text('{"step": 5}\n')
    check.record("speed", {"status": "ok", "seconds": 3, "rows": [ROW]})
    files = sorted(p.name for p in check.out.iterdir())
    assert files == ["results.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(check.out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu_check/paper_scale/shapes3d_vlae/metrics.jsonl" in names and "gpu_check/gpu_check.log" in names
    assert not any(n.endswith(".pt") for n in names)
    md = (check.out / "summary.md").read_text()
    assert "| speed | ok | 3 |" in md and "| 0.96 | 7% / 53% / failed |" in md
    assert json.loads((check.out / "summary.json").read_text())["parts"]["speed"]["rows"] == [ROW]


def test_unknown_parts_are_refused(capsys):
    with pytest.raises(SystemExit):
        GC.parse_args(["--out", "x", "--parts", "speed,warp"])
    assert "unknown part(s) ['warp']" in capsys.readouterr().err


@pytest.mark.slow
def test_the_dry_run_runs_every_part_on_the_cpu(tmp_path):
    """The whole check with tiny sizes (about 4 CPU-minutes); every part must report ok, the CUDA tests 'skipped: no
    CUDA' (or ok on a GPU machine), the output folder must hold only what the GPU machine returns, and the packed
    models must unpack into run folders."""
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(BENCH, "gpu_check.py"), "--dry-run", "--out", str(out)]
    cmd += ["--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["parts"]) == {"environment", "speed", "cuda_tests", "paper_scale"} and summary["all_ok"]
    for name, part in summary["parts"].items():
        expected = "skipped: no CUDA" if name == "cuda_tests" and not torch.cuda.is_available() else "ok"
        assert part["status"] == expected, (name, part)
    rows = summary["parts"]["speed"]["rows"]
    assert [(r["model"], r["preset"]) for r in rows] == [(m, p) for p in ("mnist-cpu", "shapes3d-32") for m in KINDS]
    assert all("img_s" in r["modes"][m] for r in rows for m in ("hand", "svi", "safe"))
    ps = summary["parts"]["paper_scale"]["result"]
    assert set(ps["runs"]) == {"shapes3d_vlae", "shapes3d_hvae", "shapes3d_vae-beta4", "mnist-paper_vlae"}
    assert all(r["rc"] == 143 and r["step"] > 0 for r in ps["runs"].values())
    files = list(out.iterdir())
    assert len(files) <= MAX_FILES and all(NAME.match(p.name) and p.stat().st_size < MAX_BYTES for p in files)
    assert sum(p.stat().st_size for p in files) <= MP.MAX_TOTAL_BYTES
    assert {"summary.json", "summary.md", "results.tar.gz", MP.MANIFEST} <= {p.name for p in files}
    runs = MP.unpack(out, tmp_path / "back")
    assert sorted(p.name for p in runs) == sorted(ps["runs"])
    assert all((p / "checkpoints" / "latest.pt").exists() and (p / "config.json").exists() for p in runs)


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
    monkeypatch.setattr(PR, "GRACE_S", 1)
    target = child(tmp_path, "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)\n")
    with sigterm_ignored_from_exec():
        part = PR.Part(check, "hang", target, [], timeout_s=2, stop=lambda: json.loads('{"step": 1'))
    res = part.wait()
    assert res["rc"] == -9 and res["signal"].startswith("timed out") and res["stop_error"].startswith("JSONDecodeError")


def test_the_step_count_of_a_run_still_writing_ignores_its_cut_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n{"step": 20}\n{"step": 3')
    assert GR.metrics_steps(tmp_path) == 20
    assert GR.metrics_steps(tmp_path / "missing") == 0
