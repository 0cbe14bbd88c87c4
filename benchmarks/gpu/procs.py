"""Child processes for the GPU check and the paper-scale driver: each with its own log, time limit and planned stop.

A :class:`Part` runs ``python -c RUNNER target args`` in a process group of its own.  A watcher thread sends SIGTERM
when its time limit has passed, its ``stop`` callback holds or :meth:`Part.request_stop` was called (a training run
then writes its checkpoint and exits with 143), and SIGKILL to the whole group ``GRACE_S`` later if it is still
running.  A part started with ``first_signal=SIGINT`` (pytest, which writes its report on SIGINT and not on SIGTERM)
gets SIGINT first and SIGTERM ``INT_GRACE_S`` later.  ``RUNNER`` records the CUDA allocator's peak when the child
exits.  :class:`GpuSampler` samples ``nvidia-smi`` once a second.

Every part's process group is also appended to the file named by ``$GPU_CHECK_PGIDS`` when that is set (children
inherit it, so the paper-scale driver's runs are listed too): :func:`kill_leftover_groups` then stops whatever is
still running there, so a driver killed before it could stop its own children leaves nothing on the GPU.

The last section restarts a failed training run (``benchmarks/gpu/paper_scale.py``): :func:`restart_argv`.

Nothing here imports torch but :func:`checkpoint_step`, which reads a checkpoint on the CPU: the parent processes stay
off the GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

GRACE_S = 30  # after SIGTERM: time to write a checkpoint before SIGKILL
INT_GRACE_S = 10  # after SIGINT (pytest): time to write the report before SIGTERM
PGIDS_ENV = "GPU_CHECK_PGIDS"  # a file listing every part's process group, one a line
#: The warning a run logs when its CUDA graph capture failed and it trains eagerly (pyro_vlae/training/step.py).
CAPTURE_FAILED = "CUDA graph capture of the training step failed"

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
    """One child process, ``python -c RUNNER target args``, with its own log (``<work>/logs/<name>.log``).

    :param owner: anything with ``work`` (a folder), ``dry_run`` (one thread per child on a CPU) and ``sampler``
        (a :class:`GpuSampler` or ``None``).
    :param timeout_s: SIGTERM after this many seconds, SIGKILL ``GRACE_S`` later.
    :param stop: optional callback; when it returns true the child gets SIGTERM, recorded as "stopped by SIGTERM as
        planned" or, when it returns a string, as that string.
    :param first_signal: the signal that starts a stop (SIGTERM; SIGINT for pytest, then SIGTERM ``INT_GRACE_S``
        later).
    """

    def __init__(self, owner, name, target, args, timeout_s, stop=None, cwd=None, first_signal=signal.SIGTERM):
        self.owner, self.name, self.timeout_s, self.stop = owner, name, timeout_s, stop
        self.first_signal, self.requested = first_signal, ""
        self.log = Path(owner.work) / "logs" / f"{name}.log"
        self.peak_file = self.log.with_name(f"{name}.peak.json")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GPU_CHECK_PEAK": str(self.peak_file)}
        if owner.dry_run:
            env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-c", RUNNER, str(target), *map(str, args)]
        self.command = " ".join(["python", str(target), *map(str, args)])
        self.t0, self.signalled, self.stop_error = time.time(), "", None
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd or REPO, env=env, start_new_session=True
            )
        register_group(self.proc.pid)
        children = getattr(owner, "children", None)
        if children is not None:
            children.append(self)
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _signal(self, sig, why):
        self.signalled = self.signalled or why
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def request_stop(self, why: str) -> None:
        """Stop the child as a planned stop would (the watcher sends the signals), recorded as ``why``."""
        self.requested = self.requested or why

    def _why_stop(self, now):
        if now - self.t0 > self.timeout_s:
            return f"timed out after {self.timeout_s:.0f} s"
        if self.requested:
            return self.requested
        if self.stop is not None and (why := self._stop_now()):
            return why if isinstance(why, str) else "stopped by SIGTERM as planned"
        return None

    def _watch(self):
        started, termed = None, None  # when the stop began; when SIGTERM went
        while self.proc.poll() is None:
            now = time.time()
            if started is None and (why := self._why_stop(now)):
                self._signal(self.first_signal, why)
                started = now
                termed = now if self.first_signal == signal.SIGTERM else None
            elif started is not None and termed is None and now - started > INT_GRACE_S:
                self._signal(signal.SIGTERM, f"SIGTERM {INT_GRACE_S} s after SIGINT")
                termed = now
            elif termed is not None and now - termed > GRACE_S:
                self._signal(signal.SIGKILL, f"killed {GRACE_S} s after SIGTERM")
            time.sleep(0.5)

    def _stop_now(self):
        """The planned-stop callback; an error in it must not end the watcher (the timeout and kill would go too)."""
        try:
            return self.stop()
        except Exception as e:  # noqa: BLE001 - any failure of the callback only postpones the planned stop
            self.stop_error = f"{type(e).__name__}: {e}"
            return False

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> dict:
        self.watcher.join()
        self.proc.wait()
        t1 = time.time()
        res = {"command": self.command, "rc": self.proc.returncode, "seconds": round(t1 - self.t0, 1)}
        if self.signalled:
            res["signal"] = self.signalled
        res.update({"stop_error": self.stop_error} if self.stop_error else {})
        if self.peak_file.exists():
            res["peak_gpu"] = read_json(self.peak_file)
        if self.owner.sampler is not None:
            res.update(self.owner.sampler.window(self.t0, t1))
        return res

    def tail(self, n=40) -> list:
        return self.log.read_text(errors="replace").splitlines()[-n:] if self.log.exists() else []


REPO = Path(__file__).resolve().parents[2]  # this file is benchmarks/gpu/procs.py


def register_group(pgid: int) -> None:
    """Append ``pgid`` to the file named by ``$GPU_CHECK_PGIDS`` (one short append: atomic between processes)."""
    path = os.environ.get(PGIDS_ENV)
    if path:
        with contextlib.suppress(OSError), open(path, "a") as f:  # the list is a safety net, never a cause to fail
            f.write(f"{pgid}\n")


def group_alive(pgid: int) -> bool:
    """Whether a process group still has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp
            return True
    return not Path("/proc/self/stat").exists()  # no /proc: trust killpg


def kill_leftover_groups(path: Path, grace_s: float = 5.0) -> list:
    """SIGTERM, then ``grace_s`` later SIGKILL, to every group listed in ``path`` that is still running; returns them.

    The parts' own watchers stop their groups; this catches those whose watcher died with its process (a driver killed
    while its runs were still training)."""
    try:
        pgids = sorted({int(line) for line in Path(path).read_text().split() if line.isdigit()})
    except OSError:
        return []
    left = [g for g in pgids if g != os.getpgrp() and group_alive(g)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in left if sig == signal.SIGTERM else [g for g in left if group_alive(g)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)
        t = time.time()
        while sig == signal.SIGTERM and time.time() - t < grace_s and any(group_alive(g) for g in left):
            time.sleep(0.2)
    return left


def atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; ``{}`` when it is missing or cut short (a part killed while writing)."""
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        return {}


def status(res: dict, ok: bool, why: str = "") -> dict:
    """Set ``res["status"]`` to ``ok`` or ``failed: <why>`` (the signal or exit code when no reason is given)."""
    if ok:
        res["status"] = "ok"
    else:
        detail = why or res.get("signal") or f"exit code {res.get('rc')}"
        res["status"] = f"failed: {detail}"
    return res


# ---------------------------------------------------------------------------------------------------------------------
# Restarting a failed training run (benchmarks/gpu/paper_scale.py).


def capture_fallback(log: Path) -> str | None:
    """The run log's line saying the CUDA graph capture failed and the run trains eagerly, if there is one."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return None
    return next((line.strip()[:400] for line in text.splitlines() if CAPTURE_FAILED in line), None)


def _drop(argv: list, flag: str) -> list:
    """``argv`` without ``flag`` and its value."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif str(a) == flag:
            skip = True
        else:
            out.append(a)
    return out


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of ``run_dir``'s latest checkpoint; ``None`` when there is none that loads."""
    path = Path(run_dir) / "checkpoints" / "latest.pt"
    if not path.exists():
        return None
    try:
        import torch

        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is no checkpoint to resume
        return None


def restart_argv(argv: list, run_dir: Path) -> tuple:
    """``(argv, how)`` of the restart of a failed run with ``--cuda-graph off``: a forced resume of ``run_dir`` from its
    latest checkpoint, or, when it has none, a fresh run in ``run_dir`` once the failed one is moved aside."""
    base = [*_drop(_drop(argv, "--cuda-graph"), "--run-dir"), "--cuda-graph", "off"]
    step = checkpoint_step(run_dir)
    if step is not None:
        return [*base, "--resume", run_dir, "--force-config"], f"forced resume from its checkpoint at step {step}"
    aside = run_dir.with_name(run_dir.name + ".failed")
    if aside.exists():
        shutil.rmtree(aside)
    if run_dir.exists():
        run_dir.rename(aside)
    return [*base, "--run-dir", run_dir], f"a fresh run (no checkpoint to resume; the failed one kept as {aside.name})"
