"""Data-parallel training: shards, shared noise, and 2-process torchrun runs equal to one process of twice the batch."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_vlae.data import load_data
from pyro_vlae.guides import get_guide
from pyro_vlae.presets import get_preset
from pyro_vlae.training import batches as B
from pyro_vlae.training import distributed as D
from pyro_vlae.training import loop as T
from pyro_vlae.training import runs as TR
from pyro_vlae.training.checkpoint import load_checkpoint

#: A bound for a hung subprocess, not a speed test: a busy 2-core machine runs these several times slower.
HANG_S = 1800

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
if os.path.exists("/sys/class/net/lo"):
    ENV["GLOO_SOCKET_IFNAME"] = "lo"  # containers whose hostname resolves to an unreachable address
for key in D.TORCHRUN_KEYS:
    ENV.pop(key, None)

#: Parameters whose gradient is zero in exact arithmetic (the bias of a linear map feeding a batch-normalised layer,
#: which batch norm cancels) have a gradient RMS near 1e-7, five orders below every other parameter.  Adam moves them
#: by the sign of rounding noise, so any two runs that sum in a different order disagree there by up to 2 lr per step;
#: they are left out of the parameter comparison (their gradients still enter the moment comparison).
GRAD_RMS_FLOOR = 1e-4
PARAM_TOL = 1e-4  # max |difference| of live parameters and batch-norm running variances
MOMENT_TOL = 1e-4  # relative L2 difference of Adam's first and second moments (the summed gradients of every step)

# A helper run by torchrun in place of ``-m pyro_vlae.run``: it records every file this rank creates, writes, renames
# or removes under the test folder (Python audit events), then calls the CLI's ``main``.
RECORDER = """
import os, sys
root, argv, written = os.path.realpath(sys.argv[1]), sys.argv[2:], set()
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & (os.O_WRONLY | os.O_RDWR))
    elif event in ("os.mkdir", "os.remove", "os.rmdir"):
        path, writes = args[0], True
    elif event == "os.rename":  # os.replace too
        path, writes = args[1], True
    else:
        return
    if writes and isinstance(path, (str, os.PathLike)) and os.path.realpath(path).startswith(root):
        written.add(os.path.relpath(os.path.realpath(path), root))
sys.addaudithook(hook)
from pyro_vlae.run import main
code = main(argv)
print(f"rank {os.environ['RANK']} wrote {sorted(written)}", flush=True)
sys.exit(code)
"""

QUIET_FLAGS = ("--no-progress", "--no-figures", "--no-eval")


def torchrun(*args, cwd):
    """``torchrun --standalone``: its rendezvous store binds a free port itself (port 0), so no port is chosen here
    and then taken by another process before torchrun binds it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=HANG_S)


# ---------------------------------------------------------------------------------------------------------------------
# Pieces, in one process.


def test_torchrun_environment_is_detected():
    assert D.from_env({}) is None and D.from_env({"RANK": "0"}) is None
    assert D.from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4, 1)
    with pytest.raises(ValueError, match="inconsistent torchrun environment"):
        D.from_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    assert type(D.current()) is D.SingleProcess and D.current().is_lead


def test_shards_and_binarisation_concatenate_to_the_one_process_batch():
    idx = T.BatchOrder(64, 2 * 8, seed=5).indices(3)
    ranks = [D.DataParallel(r, 2, r, "cpu") for r in range(2)]
    assert torch.equal(torch.cat([p.shard(idx) for p in ranks]), idx)
    x = torch.rand(16, 1, 4, 4)
    torch.manual_seed(0)
    one = torch.bernoulli(x)
    parts = []
    for p in ranks:
        torch.manual_seed(0)
        parts.append(p.bernoulli(p.shard(x)))
    assert torch.equal(torch.cat(parts), one)


def test_shard_noise_gives_each_rank_its_rows_of_the_one_process_noise():
    cfg = get_preset("tiny").model
    guide = get_guide("vlae", cfg).eval()  # eval: batch norm then treats the halves as the whole batch would
    x = torch.rand(8, *cfg.image_shape)
    torch.manual_seed(1)
    one = poutine.trace(guide).get_trace(x)
    halves = []
    for r in range(2):
        torch.manual_seed(1)
        halves.append(poutine.trace(D.ShardNoise(r, 2)(guide)).get_trace(x[4 * r : 4 * (r + 1)]))
    for site in ("z1", "z2", "z3"):
        joined = torch.cat([h.nodes[site]["value"] for h in halves])
        assert torch.allclose(joined, one.nodes[site]["value"], atol=1e-6), site

    def gamma_guide():
        with pyro.plate("data", 3):
            pyro.sample("z", dist.Gamma(torch.ones(3), 1.0))

    with pytest.raises(NotImplementedError, match="'z'.*Gamma"):
        D.ShardNoise(0, 2)(gamma_guide)()


def test_global_batch_norm_keeps_tensors_and_is_plain_batch_norm_without_a_group():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
    weight, keys = net[1].weight, list(net.state_dict())
    x = torch.randn(6, 3)
    expected = net[:2](x)
    D.use_global_batch_norm(net)
    assert isinstance(net[1], D.GlobalBatchNorm) and isinstance(net[2][1], D.GlobalBatchNorm)
    assert net[1].weight is weight and list(net.state_dict()) == keys
    assert torch.allclose(net[:2](x), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Two processes under torchrun against one process with twice the batch.


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """3 steps with 2 processes of batch 8 (recording each rank's writes), then ``--resume`` under torchrun to 5."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "recorder.py").write_text(RECORDER)
    flags = ["--dataset", "synthetic", "--batch-size", "8", "--log-every", "1", *QUIET_FLAGS]
    first = torchrun(
        "recorder.py", str(root), *flags, "--num-steps", "3", "--sync-batch-norm", "--run-dir", "run", cwd=root
    )
    assert first.returncode == 0, first.stdout + first.stderr
    shutil.copy(root / "run" / "checkpoints" / "latest.pt", root / "step3.pt")
    resumed = torchrun("-m", "pyro_vlae.run", "--resume", "run", "--num-steps", "5", *QUIET_FLAGS, cwd=root)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return root, first, resumed


def test_only_rank_0_writes_and_prints(ddp_run):
    root, first, resumed = ddp_run
    rank1 = [s for s in first.stdout.splitlines() if s.startswith("rank 1 wrote")]
    rank0 = [s for s in first.stdout.splitlines() if s.startswith("rank 0 wrote")]
    assert rank1 == ["rank 1 wrote []"], first.stdout
    for rel in ("config.json", "metrics.jsonl", "checkpoints/latest.pt", "eval.json", "run.lock"):
        assert f"'{os.path.join('run', rel)}'" in rank0[0], rank0
    assert first.stdout.count("run folder:") == 1 and resumed.stdout.count("run folder:") == 1


def test_resume_under_torchrun_continues(ddp_run):
    root, _, resumed = ddp_run
    assert [json.loads(s)["step"] for s in (root / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert load_checkpoint(str(root / "run" / "checkpoints" / "latest.pt"))["step"] == 5
    extra = json.loads((root / "run" / "config.json").read_text())["extra"]
    assert extra == {"world_size": 2, "sync_batch_norm": True}
    assert "trained 5 steps" in resumed.stdout


def _one_process(run_dir, order_seed_shift=0, monkeypatch=None) -> tuple:
    """Checkpoints after 3 and 5 steps of one process with batch 16 (``--dataset synthetic`` defaults, seed 0)."""
    p = get_preset("tiny")
    tc = dataclasses.replace(p.train, num_steps=5, batch_size=16, log_every=100, checkpoint_every=3, keep_every=3)
    if order_seed_shift:
        monkeypatch.setattr(B, "BatchOrder", lambda n, b, seed, _cls=B.BatchOrder: _cls(n, b, seed + order_seed_shift))
    bundle = load_data("synthetic", "unused", 16, seed=0)
    config = TR.RunConfig("vlae", "synthetic", "tiny", p.model, tc, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker: two threads on a busy 2-core box are several times slower
    try:
        T.fit(config, bundle, str(run_dir), "cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    return tuple(load_checkpoint(str(run_dir / "checkpoints" / f)) for f in ("step3.pt", "latest.pt"))


def distance(a: dict, b: dict, ref: dict) -> tuple:
    """``(max |a - b|`` over live parameters and running variances, relative L2 distance of Adam's moments``)``.

    Live elements are those whose gradient RMS in ``ref`` (from Adam's second moment) exceeds ``GRAD_RMS_FLOOR``.
    """
    diffs, num, den = [], torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for name, st in ref["optim"].items():
        part, key = name.replace("$$$", ".").split(".", 1)
        live = st["state"][0]["exp_avg_sq"].sqrt() > GRAD_RMS_FLOOR
        diffs.append((a[part][key] - b[part][key])[live].abs().flatten())
        for i, m in enumerate(("exp_avg", "exp_avg_sq")):
            ma, mb = (s["optim"][name]["state"][0][m].double() for s in (a, b))
            num[i] += (ma - mb).pow(2).sum()
            den[i] += mb.pow(2).sum()
    for part in ("model", "guide"):
        diffs += [(a[part][k] - b[part][k]).abs().flatten() for k in a[part] if k.endswith("running_var")]
    return float(torch.cat(diffs).max()), float((num / den).sqrt().max())


def test_two_processes_equal_one_process_of_twice_the_batch(ddp_run, tmp_path, monkeypatch):
    """Parameters (and the summed gradients in Adam's moments) after 3 steps, and after a resume to 5, match.

    Negative control: the same one-process run on another data order is far outside both tolerances.
    """
    root = ddp_run[0]
    one3, one5 = _one_process(tmp_path / "one")
    ddp3, ddp5 = (
        load_checkpoint(str(root / "step3.pt")),
        load_checkpoint(str(root / "run" / "checkpoints" / "latest.pt")),
    )
    _, other = _one_process(tmp_path / "other", order_seed_shift=1, monkeypatch=monkeypatch)
    for ddp, one in ((ddp3, one3), (ddp5, one5)):
        params, moments = distance(ddp, one, one)
        print(f"2 processes vs 1 at step {one['step']}: max |param diff| {params:.2e}, moment rel. diff {moments:.2e}")
        assert params < PARAM_TOL and moments < MOMENT_TOL
    params, moments = distance(other, one5, one5)
    print(f"negative control (another data order): max |param diff| {params:.2e}, moment rel. diff {moments:.2e}")
    assert params > 10 * PARAM_TOL and moments > 10 * MOMENT_TOL
