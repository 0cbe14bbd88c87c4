"""Atomic writes, safe checkpoint loading, RNG round trips and the run lock."""

import json
import os
import pickle
import random
import socket

import numpy as np
import pytest
import torch

from pyro_vlae.training import checkpoint as C


def valid_state(step=3):
    return {"model": {"w": torch.ones(2)}, "guide": {}, "optim": {}, "step": step, "config": {"a": 1}}


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.json"
    C.atomic_write_json(str(p), {"a": 1})
    C.atomic_write_json(str(p), {"b": 2})
    assert p.read_text().strip().startswith("{") and '"b": 2' in p.read_text()
    assert os.listdir(tmp_path) == ["f.json"]


def test_save_and_load_round_trip(tmp_path):
    p = str(tmp_path / "c.pt")
    C.save_checkpoint(p, valid_state(7))
    state = C.load_checkpoint(p)
    assert state["step"] == 7 and torch.equal(state["model"]["w"], torch.ones(2))


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(C.CheckpointError, match="no checkpoint at .* train first"):
        C.load_checkpoint(str(tmp_path / "latest.pt"))


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.99], ids=["10pct", "half", "almost"])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, cut):
    p = tmp_path / "c.pt"
    C.save_checkpoint(str(p), valid_state())
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(C.CheckpointError, match="corrupt or truncated"):
        C.load_checkpoint(str(p))


def test_garbage_and_wrong_content_are_refused(tmp_path):
    p = tmp_path / "c.pt"
    p.write_bytes(os.urandom(1000))
    with pytest.raises(C.CheckpointError, match="corrupt or truncated"):
        C.load_checkpoint(str(p))
    torch.save({"just": torch.zeros(1)}, p)
    with pytest.raises(C.CheckpointError, match="not a pyro_vlae checkpoint"):
        C.load_checkpoint(str(p))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_pickle_payload_is_refused_and_nothing_executes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pt"
    state = valid_state()
    state["config"] = {"x": _Payload()}
    with open(p, "wb") as f:
        torch.save(state, f, pickle_module=pickle)
    with pytest.raises(C.CheckpointError, match="refusing to load"):
        C.load_checkpoint(str(p))
    assert not (tmp_path / "pwned_marker").exists()


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    p = str(tmp_path / "c.pt")
    C.save_checkpoint(p, {**valid_state(), "rng": C.rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    C.set_rng_state(C.load_checkpoint(p)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def write_lock(folder, **owner):
    """A ``run.lock`` in ``folder`` from this host, boot and a dead PID, with ``owner``'s fields changed."""
    text = json.dumps({**C.lock_owner(), "pid": 999999999, **owner})
    (folder / "run.lock").write_text(text)
    return text


def held_by_me(folder):
    return json.loads((folder / "run.lock").read_text()) == C.lock_owner()


def test_lock_owner_names_host_pid_and_boot():
    owner = C.lock_owner()
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    if os.path.exists("/proc/sys/kernel/random/boot_id"):
        with open("/proc/sys/kernel/random/boot_id") as f:
            assert owner["boot_id"] == f.read().strip()
    else:
        assert owner["boot_id"] is None


def test_stale_lock_takeover_waits_for_the_folder_guard(tmp_path):
    """A start that finds a stale lock checks and takes it only under the folder's flock, so two starts in the same
    instant cannot both take it over."""
    import threading

    stale = write_lock(tmp_path)
    got = []
    with C.folder_guard(str(tmp_path)):  # another start is between its check and its take
        t = threading.Thread(target=lambda: got.append(C.RunLock(str(tmp_path)).acquire()), daemon=True)
        t.start()
        t.join(0.5)
        assert t.is_alive() and (tmp_path / "run.lock").read_text() == stale, "it must wait for the guard"
    t.join(60)
    assert not t.is_alive() and got[0].held and held_by_me(tmp_path)
    got[0].release()


def test_folder_without_flock_still_locks_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="no flock on this filesystem"):
        with C.RunLock(str(tmp_path)) as lock:
            assert lock.held and held_by_me(tmp_path)


def test_run_lock_refuses_a_live_owner_and_takes_over_a_stale_one(tmp_path):
    with C.RunLock(str(tmp_path)):
        assert held_by_me(tmp_path)
        write_lock(tmp_path, pid=1)  # PID 1 is always alive
        with pytest.raises(C.RunLockedError, match="in use by process 1"):
            C.RunLock(str(tmp_path)).acquire()
    write_lock(tmp_path)  # this host and boot, no such process: stale
    with C.RunLock(str(tmp_path)) as lock:
        assert lock.held and held_by_me(tmp_path)
    assert not (tmp_path / "run.lock").exists()


@pytest.mark.parametrize(
    "owner, message",
    [
        ({"host": "node-b"}, "locked by process 999999999 on host node-b .* never taken over"),
        ({"host": "node-b", "pid": 1}, "locked by process 1 on host node-b"),
        ({"boot_id": "another-boot"}, "under another boot .*boot id another-boot"),
        (None, "does not name its owner's host"),
    ],
    ids=["other-host-pid-absent-here", "other-host-pid-alive-here", "other-boot", "pid-only-file"],
)
def test_run_lock_is_never_taken_over_when_its_owner_cannot_be_seen(tmp_path, owner, message):
    """A lock from another host (whatever its PID means here), from another boot or naming no host stays, with an
    error that says how to remove a truly stale lock."""
    if owner is None:
        (tmp_path / "run.lock").write_text("999999999")  # the older format: a PID alone
    else:
        write_lock(tmp_path, **owner)
    before = (tmp_path / "run.lock").read_text()
    with pytest.raises(C.RunLockedError, match=message) as e:
        C.RunLock(str(tmp_path)).acquire()
    assert f"delete {tmp_path / 'run.lock'} and start again" in str(e.value)
    assert (tmp_path / "run.lock").read_text() == before


def test_load_run_builds_model_and_guide_only(tmp_path, monkeypatch):
    """Evaluation needs the networks alone: loading a run constructs no optimiser and no SVI object."""
    from pyro_vlae.presets import get_preset
    from pyro_vlae.training import runs

    preset = get_preset("tiny")
    config = runs.RunConfig("vlae", "synthetic", "tiny", preset.model, preset.train)
    model, guide, optim, _ = runs.build(config, "cpu")
    runs.save_run_checkpoint(str(tmp_path), model, guide, optim, 0, config)

    def refuse(*a, **k):
        raise AssertionError("load_run built training machinery")

    monkeypatch.setattr(runs, "FusedAdam", refuse)
    monkeypatch.setattr(runs, "SVI", refuse)
    model2, guide2, config2, _ = runs.load_run(str(tmp_path))
    assert config2.model_kind == "vlae"
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k])
