"""The torch renderers of the procedural datasets draw the numpy renderers' images bit for bit (on the CPU here; on
CUDA in the tests that skip without one)."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_vlae.data import load_data
from pyro_vlae.data import shapes3d as S3
from pyro_vlae.data import sprites as SP


def CUDA(test):
    """Mark ``test`` as a ``cuda`` test (the GPU check runs ``-m cuda``) that skips without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def _factors(sizes, n, seed):
    return np.random.default_rng(seed).integers(0, sizes, size=(n, len(sizes)))


def _old_render_sprites(f, size):
    """The numpy sprites renderer as it was before the shared tables: per-item ``np.cos``/``np.sin`` and ``** 3``."""
    v = {k: val[f[:, i]][:, None, None] for i, (k, val) in enumerate(SP.sprites_factor_values().items())}
    half, theta, span = v["scale"] * 0.16, v["orientation"], 1 - 2 * 0.24
    grid = (np.arange(size) + 0.5) / size
    dx = grid[None, None, :] - (0.24 + span * v["pos_x"])
    dy = grid[None, :, None] - (0.24 + span * v["pos_y"])
    a = (np.cos(theta) * dx + np.sin(theta) * dy) / half
    b = (np.cos(theta) * dy - np.sin(theta) * dx) / half
    square = np.maximum(np.abs(a), np.abs(b)) <= 1
    ellipse = a**2 + (2 * b) ** 2 <= 1
    hx, hy = 1.2 * a, 0.1 - 1.2 * b
    heart = (hx**2 + hy**2 - 1) ** 3 <= hx**2 * hy**3
    return np.where(v["shape"] == 0, square, np.where(v["shape"] == 1, ellipse, heart)).astype(np.float32)[:, None]


@pytest.mark.parametrize("size", [32, 64], ids=["32px", "64px"])
def test_shapes3d_torch_renderer_equals_numpy(size):
    f = _factors(S3.SHAPES3D_SIZES, 300, seed=size)
    f[:4, 3:] = [[0, 0, 0], [7, 1, 14], [3, 2, 7], [5, 3, 2]]  # every shape at least once
    want = S3.render_shapes3d(f, size)
    renderer = S3.Shapes3DRenderer(size)
    got = renderer(torch.from_numpy(f))
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(want))
    levels = torch.from_numpy(S3.render_shapes3d_uint8(f, size)).float()
    assert torch.equal(renderer.unit(levels.clone(), lookup=True), got)  # the non-CPU way of dividing by 255
    assert torch.equal(renderer.unit(levels.clone(), lookup=False), got)


@pytest.mark.parametrize("size", [32, 64], ids=["32px", "64px"])
def test_sprites_torch_renderer_equals_numpy_and_the_numpy_renderer_did_not_change(size):
    f = _factors(SP.SPRITES_SIZES, 300, seed=size)
    f[:120, 0], f[:120, 2] = np.repeat(np.arange(3), 40), np.tile(np.arange(40), 3)  # every shape at every angle
    want = SP.render_sprites(f, size)
    assert want.any() and not want.all()
    assert np.array_equal(want, _old_render_sprites(f, size))  # the shared tables and products changed no pixel here
    renderer = SP.SpritesRenderer(size)
    got = renderer(torch.from_numpy(f))
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(want))
    # the images are 0/1, so a last-bit difference would rarely show in them: the coordinates themselves agree
    for ours, theirs in zip(renderer.frame(torch.from_numpy(f)), SP.sprite_frame(f, size)):
        assert ours.dtype == torch.float64 and np.array_equal(ours.numpy(), theirs)


@pytest.mark.parametrize("name", ["sprites", "shapes3d"])
def test_grid_renderer_draws_the_datasets_items_without_a_host_read(name):
    ds = load_data(name, "unused", 8, **{f"{name}_size": 32}).train
    items = torch.tensor([5, 0, len(ds) - 1, 3, 3, 123_456])
    renderer = ds.renderer("cpu")
    assert np.array_equal(renderer.factors(items).numpy(), ds.factors(items.numpy()))
    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        got = renderer(items)
    assert calls and not [c for c in calls if "_local_scalar_dense" in c]
    assert torch.equal(got, ds.images(items.numpy()))


@CUDA
@pytest.mark.parametrize("name", ["sprites", "shapes3d"])
@pytest.mark.parametrize("size", [32, 64], ids=["32px", "64px"])
def test_cuda_renderer_equals_numpy(name, size):
    ds = load_data(name, "unused", 8, **{f"{name}_size": size}).train
    items = torch.from_numpy(np.random.default_rng(size).integers(0, len(ds), 512))
    got = ds.renderer("cuda")(items.cuda())
    assert got.is_cuda and torch.equal(got.cpu(), ds.images(items.numpy()))
