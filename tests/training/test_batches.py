"""Batches: the CPU order of every run stays what it was, the device gather reads what the host path read, fill()
writes in place, shards stay disjoint and complete, and the hot path reads nothing from the device."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import TensorDataset

from pyro_vlae.data import load_data
from pyro_vlae.training import batches as B
from pyro_vlae.training import distributed as D


def CUDA(test):
    """Mark ``test`` as a ``cuda`` test (the GPU check runs ``-m cuda``) that skips without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def old_indices(n, batch_size, seed, step):
    """A transcription of the order every run had before the data moved to the device."""
    epoch, k = divmod(step, n // batch_size)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * batch_size : (k + 1) * batch_size]


def old_batch(bundle, idx, binarize):
    """A transcription of the host path: index the training tensor (or render), then binarise."""
    x = bundle.train.images(idx.numpy()) if hasattr(bundle.train, "images") else bundle.train.tensors[0][idx]
    return torch.bernoulli(x) if binarize else x


class Numbered:
    """A bundle of ``n <= 128`` 1x2x2 images whose pixels are the image's index / 128 (exact in float32, a valid
    probability): a batch shows which items it holds."""

    def __init__(self, n):
        x = torch.arange(n, dtype=torch.float32).div(128).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
        self.train = TensorDataset(x)
        self.image_shape = (1, 2, 2)

    def tensors(self, split):
        return self.train.tensors[0], None


@pytest.fixture(scope="module")
def synthetic():
    return load_data("synthetic", "unused", 16, seed=2)


def test_cpu_order_is_the_order_runs_always_had():
    for n, b, seed in [(512, 16, 0), (50, 10, 3), (1000, 7, 11)]:
        order = B.BatchOrder(n, b, seed)
        for step in [0, 1, n // b - 1, n // b, 3 * (n // b) + 2]:  # across epoch boundaries
            assert order.device.type == "cpu" and torch.equal(order.indices(step), old_indices(n, b, seed, step))


@pytest.mark.parametrize("binarize", [False, True], ids=["grey", "binarized"])
def test_memory_batches_are_the_old_batches(synthetic, binarize):
    batches = B.Batches(synthetic, 16, 2, D.SingleProcess(), "cpu", binarize)
    assert batches.source == "memory" and batches.data.device.type == "cpu"
    for step in [0, 5, 31, 32, 70]:  # 32 steps per epoch
        torch.manual_seed(step)
        got = batches(step)
        torch.manual_seed(step)
        assert torch.equal(got, old_batch(synthetic, old_indices(512, 16, 2, step), binarize))


@pytest.mark.parametrize("name", ["shapes3d", "sprites"])
@pytest.mark.parametrize("torch_renderer", [False, True], ids=["numpy", "torch"])
def test_procedural_batches_on_the_cpu_are_the_old_batches(name, torch_renderer, monkeypatch):
    """Procedural data on the CPU is rendered by numpy, as before; the device path (the torch renderer, forced onto
    the CPU here) reads the same images."""
    monkeypatch.setattr(B, "RENDER_ON_CPU", torch_renderer)
    bundle = load_data(name, "unused", 8, **{f"{name}_size": 32})
    batches = B.Batches(bundle, 8, 0, D.SingleProcess(), "cpu", False)
    assert batches.source == ("render" if torch_renderer else "host")
    n = len(bundle.train)
    for step in [3, n // 8 + 1]:
        assert torch.equal(batches(step), old_batch(bundle, old_indices(n, 8, 0, step), False))


@pytest.mark.parametrize("binarize", [False, True], ids=["grey", "binarized"])
def test_fill_writes_the_batch_in_place(synthetic, binarize):
    batches = B.Batches(synthetic, 16, 2, D.SingleProcess(), "cpu", binarize)
    out = torch.full(batches.shape, -1.0)
    where = out.data_ptr()
    for step in [4, 40]:
        torch.manual_seed(step)
        assert batches.fill(step, out) is out and out.data_ptr() == where
        torch.manual_seed(step)
        assert torch.equal(out, batches(step))
    for bad in [torch.empty(8, 1, 16, 16), torch.empty(batches.shape, dtype=torch.float64)]:
        with pytest.raises(ValueError, match="fill needs a float32 tensor of shape"):
            batches.fill(0, bad)


def test_fill_works_for_data_read_on_the_host():
    bundle = load_data("sprites", "unused", 8, sprites_size=32)
    batches = B.Batches(bundle, 8, 1, D.SingleProcess(), "cpu", False)
    out = torch.empty(batches.shape)
    assert batches.source == "host" and torch.equal(batches.fill(2, out), batches(2))


def test_a_training_set_too_large_for_the_device_is_read_on_the_host(synthetic, monkeypatch):
    monkeypatch.setattr(B, "fits_on", lambda device, nbytes: False)
    with pytest.warns(UserWarning, match="read on the host"):
        batches = B.Batches(synthetic, 16, 2, D.SingleProcess(), "cpu", False)
    assert batches.source == "host"
    assert torch.equal(batches(33), old_batch(synthetic, old_indices(512, 16, 2, 33), False))


@pytest.mark.parametrize("binarize", [False, True], ids=["grey", "binarized"])
def test_shards_are_disjoint_complete_and_the_one_process_batch(binarize):
    n, per_rank, world = 96, 4, 2
    bundle = Numbered(n)
    one = B.Batches(bundle, world * per_rank, 7, D.SingleProcess(), "cpu", binarize)
    ranks = [B.Batches(bundle, per_rank, 7, D.DataParallel(r, world, r, "cpu"), "cpu", binarize) for r in range(world)]
    seen = []
    for step in range(n // (world * per_rank)):  # one epoch
        torch.manual_seed(step)
        whole = one(step)
        parts = []
        for batches in ranks:
            torch.manual_seed(step)  # every rank shares the random stream, as DataParallel.share_rng makes it
            parts.append(batches(step))
        assert torch.equal(torch.cat(parts), whole)
        if not binarize:
            seen += [int(v * 128) for part in parts for v in part[:, 0, 0, 0]]
    if not binarize:
        assert sorted(seen) == list(range(n))  # disjoint and complete over the epoch


class Record(TorchDispatchMode):
    """Every aten operator called under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name, binarize", [("synthetic", False), ("synthetic", True), ("shapes3d", False)])
def test_a_step_reads_nothing_from_the_device(synthetic, name, binarize, monkeypatch):
    monkeypatch.setattr(B, "RENDER_ON_CPU", True)  # the path procedural data takes on a GPU
    bundle = synthetic if name == "synthetic" else load_data(name, "unused", 16, shapes3d_size=32)
    batches = B.Batches(bundle, 16, 2, D.SingleProcess(), "cpu", binarize)
    assert batches.source == ("memory" if name == "synthetic" else "render")
    out = torch.empty(batches.shape)
    steps = len(bundle.train) // 16
    with Record() as mode:
        for step in [0, 1, steps - 1, steps]:  # a new epoch's permutation included
            batches(step), batches.fill(step, out)
    assert any("randperm" in c for c in mode.calls) and any("index_select" in c for c in mode.calls)
    assert not [c for c in mode.calls if "_local_scalar_dense" in c]
    with Record() as control:  # the recorder sees a host read when there is one
        out.sum().item()
    assert any("_local_scalar_dense" in c for c in control.calls)


@CUDA
@pytest.mark.parametrize("name", ["synthetic", "shapes3d"])
def test_cuda_batches_are_drawn_on_the_device_deterministically(name):
    bundle = load_data(name, "unused", 16, shapes3d_size=32)
    a, b = (B.Batches(bundle, 16, 3, D.SingleProcess(), "cuda", False) for _ in range(2))
    assert a.source == ("memory" if name == "synthetic" else "render")
    n = len(bundle.train)
    seen = torch.cat([a.order.indices(s) for s in range(n // 16)])  # one epoch
    assert seen.is_cuda and len(seen) == len(torch.unique(seen)) == n // 16 * 16 and int(seen.max()) < n
    x = a(5)
    assert x.is_cuda and torch.equal(x, b(5))
    assert torch.equal(x.cpu(), old_batch(bundle, a.order.indices(5).cpu(), False))
    out = torch.empty(a.shape, device="cuda")
    assert torch.equal(a.fill(6, out), a(6))


@CUDA
def test_cuda_hot_path_never_synchronises(synthetic):
    batches = B.Batches(synthetic, 16, 2, D.SingleProcess(), "cuda", True)
    out = torch.empty(batches.shape, device="cuda")
    batches(0)  # the first epoch's permutation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 40):
            batches(step), batches.fill(step, out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert np.isfinite(out.sum().item())
