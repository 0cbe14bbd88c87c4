"""Atomic writes, safe checkpoint loading and the run-folder lock (owner's host, PID and boot id).

Every file a run writes goes to a temporary file in the same folder first, is flushed and fsynced, then moved into
place with ``os.replace``: a reader sees the old file or the new one, never a torn one.  Checkpoints load with
``torch.load(..., weights_only=True)``, so a file carrying a pickled code payload is refused, and nothing executes.
Each checkpoint ends with a SHA-256 digest of its bytes, so a file altered after it was written (a flipped bit in a
weight, which torch's zip reader does not notice) is refused too.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import os
import random
import socket
import tempfile
import warnings

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or not a pyro_vlae checkpoint."""


class RunLockedError(RuntimeError):
    """Another live process is training in the same run folder."""


REQUIRED_KEYS = ("model", "guide", "optim", "step", "config")
#: Marks the SHA-256 trailer: ``torch.save`` bytes, this marker, then the 32-byte digest of those bytes.  torch.load
#: ignores bytes after the zip archive, so the files still load with a plain ``torch.load``.
DIGEST_MARKER = b"PYRO_VLAE_SHA256"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _verified_body(path: str, data: bytes) -> bytes:
    """The ``torch.save`` bytes of a checkpoint file after checking its SHA-256 trailer.

    A file without a trailer (written before it existed) is returned unchecked; a cut or mismatching trailer raises.
    """
    size = len(DIGEST_MARKER) + 32
    at = data.rfind(DIGEST_MARKER, max(0, len(data) - size))
    if at >= 0 and at == len(data) - size:
        body = data[:at]
        if hashlib.sha256(body).digest() != data[at + len(DIGEST_MARKER) :]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its SHA-256 digest does not match its content, so it changed after "
                "it was written; resume from another checkpoint in the same checkpoints/ folder or start a new run"
            )
        return body
    if at >= 0 or any(data.endswith(DIGEST_MARKER[:k]) for k in range(1, len(DIGEST_MARKER))):
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated (its SHA-256 trailer is cut short); resume from another "
            "checkpoint in the same checkpoints/ folder or start a new run"
        )
    return data


def read_json_dict(path: str, log=None) -> dict:
    """The JSON object stored at ``path``; ``{}`` when the file is missing, unreadable or not an object."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        if log is not None:
            log(f"{os.path.basename(path)} was unreadable ({e}); writing a fresh one")
        return {}
    return data if isinstance(data, dict) else {}


def update_json(path: str, updates: dict, log=None) -> dict:
    """Set the top-level ``updates`` in the JSON object at ``path``, keeping every other key; one atomic write."""
    data = read_json_dict(path, log)
    data.update(updates)
    atomic_write_json(path, data)
    return data


def save_checkpoint(path: str, state: dict) -> None:
    """Serialise ``state`` with ``torch.save`` into memory, add its SHA-256 trailer, write it atomically to ``path``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data + DIGEST_MARKER + hashlib.sha256(data).digest())


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` and check it is complete.

    :raises CheckpointError: with a message naming the file and what to do, for a missing, truncated, corrupt or
        unsafe file.  Nothing is partially loaded: callers receive the whole dict or an exception.
    """
    if not os.path.exists(path):
        raise CheckpointError(
            f"no checkpoint at {path}; train first (python -m pyro_vlae.run ...) or point at a run folder that has "
            "checkpoints/latest.pt"
        )
    with open(path, "rb") as f:
        data = f.read()
    data = _verified_body(path, data)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on the damage
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = str(e)
        if "GLOBAL" in msg or "Unsupported global" in msg:
            bad = msg.split("GLOBAL", 1)[1].split()[0] if "GLOBAL" in msg else "an object"
            raise CheckpointError(
                f"refusing to load {path}: it holds a pickled Python object ({bad}) that could execute code, and "
                "torch.load(weights_only=True) rejected it. Nothing was executed. Only load checkpoints written by "
                "pyro_vlae from sources you trust."
            ) from None
        if "WeightsUnpickler error:" in msg:  # torch's own text suggests weights_only=False: never repeat that
            text = " ".join(msg.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0].split())
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {text}); resume from another checkpoint "
            "in the same checkpoints/ folder or start a new run"
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path} is not a pyro_vlae checkpoint (missing {missing}); it cannot be resumed")
    return state


# ---------------------------------------------------------------------------------------------------------------------
# RNG state, stored in forms that weights_only loading accepts (tensors, ints, lists).


def rng_state() -> dict:
    """Capture the torch, CUDA, numpy and Python RNG states."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": _py_state_to_list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU of the machine that saved it: a machine with fewer GPUs restores those it has (setting
        # the state of a GPU that does not exist fails when CUDA starts).
        torch.cuda.set_rng_state_all(list(state["cuda"])[: torch.cuda.device_count()])


def _py_state_to_list(st):
    version, internal, gauss = st
    return [version, list(internal), gauss]


# ---------------------------------------------------------------------------------------------------------------------
# Run-folder lock.


def remove_stale_temporaries(folder: str) -> list:
    """Delete the ``.<name>.<random>.tmp`` files that a process killed during :func:`atomic_write_bytes` left behind.

    Only call this while holding the folder's :class:`RunLock`: a live writer's temporary file would be deleted too.
    Returns the paths removed.
    """
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), ".*.tmp")):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def folder_guard(folder: str):
    """Hold an exclusive ``flock`` on the folder itself while checking and taking its ``run.lock``.

    Without it two processes could both find a stale lock, both remove it and both go on; or one could read the lock
    file in the instant between another's create and its PID write.  The kernel drops the guard if its holder dies.
    Where ``fcntl`` does not exist (Windows) this does nothing.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                raise
            # Some network filesystems have no flock: the lock still works, without the guard against a race.
            warnings.warn(
                f"{folder}: no flock on this filesystem ({e.strerror}); run.lock is taken unguarded", stacklevel=3
            )
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


#: Changes at every boot of a Linux kernel; absent elsewhere.
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def lock_owner() -> dict:
    """This process as a lock owner: host name, PID and boot id (``None`` where the system has none)."""
    try:
        with open(BOOT_ID_FILE) as f:
            boot = f.read().strip() or None
    except OSError:
        boot = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": boot}


def _read_owner(path: str):
    """The owner recorded in a lock file, or ``None`` when it cannot be read as one (damaged, or an older format)."""
    try:
        with open(path) as f:
            owner = json.loads(f.read())
    except (OSError, ValueError):
        return None
    keys = ("host", "pid", "boot_id")
    if not isinstance(owner, dict) or any(k not in owner for k in keys) or not isinstance(owner["pid"], int):
        return None
    return {k: owner[k] for k in keys}


class RunLock:
    """An exclusive ``run.lock`` file naming its owner: host, PID and boot id.

    A lock is taken over only when it was written on this host during this boot by a process that is gone.  A lock
    from another host is never taken over: that process cannot be seen from here (on a shared filesystem its PID is
    meaningless locally), and neither is a lock from this host name under another boot id (a restart, or another
    machine with the same name), nor a file that does not name its owner; the error says how to remove a lock that is
    truly stale.  Checking and taking the lock happen under :func:`folder_guard`, so concurrent starts cannot both
    take it.  Use as a context manager; raises :class:`RunLockedError` when the lock cannot be taken.
    """

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "run.lock")
        self.held = False

    def acquire(self):
        with folder_guard(os.path.dirname(self.path) or "."):
            return self._acquire()

    def _refusal(self, owner, me) -> str:
        """Why the lock of ``owner`` cannot be taken, or ``""`` when it is stale and may be taken over."""
        folder, remove = os.path.dirname(self.path), f"delete {self.path} and start again"
        if owner is None:
            return (
                f"run folder {folder} has a lock file {self.path} that does not name its owner's host (damaged, or "
                f"written by an older pyro_vlae); if no process is training in this folder, {remove}"
            )
        if owner["host"] != me["host"]:
            return (
                f"run folder {folder} is locked by process {owner['pid']} on host {owner['host']} (lock file "
                f"{self.path}); a lock from another host is never taken over: wait for that run to finish, or, if "
                f"no process on {owner['host']} is training in this folder any more, {remove}"
            )
        if owner["boot_id"] != me["boot_id"]:
            return (
                f"run folder {folder} is locked by process {owner['pid']} on host {owner['host']} under another boot "
                f"(boot id {owner['boot_id']}, this one {me['boot_id']}): the machine restarted since, or another "
                f"machine has the same name (lock file {self.path}); if no process is training in this folder, {remove}"
            )
        if owner["pid"] != me["pid"] and _pid_alive(owner["pid"]):
            return (
                f"run folder {folder} is in use by process {owner['pid']} (lock file {self.path}); wait for it to "
                "finish, or use another --run-dir"
            )
        return ""

    def _acquire(self):
        me = lock_owner()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                why = self._refusal(_read_owner(self.path), me)
                if why:
                    raise RunLockedError(why) from None
                os.unlink(self.path)  # stale: written on this host and boot by a process that is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.held = True
            remove_stale_temporaries(os.path.join(os.path.dirname(self.path), "checkpoints"))
            return self
        raise RunLockedError(f"could not take the lock {self.path}")

    def release(self):
        if self.held:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
