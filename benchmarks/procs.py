"""Child processes for the GPU check and the paper-scale driver: each with its own log, time limit and planned stop.

A :class:`Part` runs ``python -c RUNNER target args`` in a process group of its own.  A watcher thread sends SIGTERM
when its time limit has passed or its ``stop`` callback holds (a training run then writes its checkpoint and exits
with 143), and SIGKILL to the whole group ``GRACE_S`` later if it is still running.  ``RUNNER`` records the CUDA
allocator's peak when the child exits.  :class:`GpuSampler` samples ``nvidia-smi`` once a second.

Nothing here imports torch: the parent processes stay off the GPU.
"""

from __future__ import annotations

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
    """

    def __init__(self, owner, name, target, args, timeout_s, stop=None, cwd=None):
        self.owner, self.name, self.timeout_s, self.stop = owner, name, timeout_s, stop
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
            elif termed is None and self.stop is not None and (why := self._stop_now()):
                self._signal(signal.SIGTERM, why if isinstance(why, str) else "stopped by SIGTERM as planned")
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


REPO = Path(__file__).resolve().parent.parent


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
