"""The procedural 3D Shapes-style scenes: factor grid, determinism, colours, geometry, loader and a CLI smoke run."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.colors import rgb_to_hsv

from pyro_vlae import data as D
from pyro_vlae import presets as P
from pyro_vlae.data import shapes3d as S3

#: A bound for a hung subprocess, not a speed test: a busy 2-core machine runs these several times slower.
HANG_S = 1800

SIZES = (10, 10, 10, 8, 4, 15)
HUES = np.arange(10) / 10  # the 3D Shapes convention: 10 hues evenly spaced in [0, 1)


def _random_factors(n, seed=0):
    return np.random.default_rng(seed).integers(0, SIZES, size=(n, 6))


def _hsv(u8):
    """HSV of uint8 ``(N, 3, H, W)`` images, by matplotlib (not by the renderer's own colour code)."""
    return rgb_to_hsv(u8.transpose(0, 2, 3, 1) / 255.0)


def _hue_tolerance(u8):
    """Largest hue error 8-bit rounding can cause at each pixel.

    Within a hue sector, ``h = (k + (mid - min) / (max - min)) / 6``. Rounding moves each channel by at most half a
    level, so ``mid - min`` and ``max - min`` each move by at most one level ``L``; since ``(mid - min) <= (max - min)``
    the fraction moves by at most ``2 / (D - 1)`` for ``D = max - min`` in rounded levels, and ``h`` by a sixth of that.
    """
    d = u8.max(1).astype(float) - u8.min(1)
    return 2.0 / (6.0 * np.maximum(d - 1.0, 1.0)) + 1e-9


def _hue_distance(a, b):
    return np.abs((a - b + 0.5) % 1.0 - 0.5)  # on the hue circle


def test_factor_grid_and_index_round_trip():
    values = D.shapes3d_factor_values()
    assert D.SHAPES3D_FACTORS == ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
    assert D.SHAPES3D_SIZES == SIZES and int(np.prod(SIZES)) == 480_000
    assert [len(values[k]) for k in D.SHAPES3D_FACTORS] == list(SIZES)
    for k in ("floor_hue", "wall_hue", "object_hue"):
        assert np.allclose(values[k], HUES)
    assert np.allclose(values["scale"], 0.75 + np.arange(8) / 14) and np.allclose(
        values["orientation"], np.arange(-30, 31, 60 / 14)
    )
    assert D.SHAPES3D_SHAPES == ("cube", "cylinder", "sphere", "capsule")
    flat = np.random.default_rng(1).integers(0, 480_000, size=1000)
    f = D.Shapes3DDataset(flat).factors()
    assert f.dtype == np.int64 and (f >= 0).all() and (f < np.array(SIZES)).all()
    horner = ((((f[:, 0] * 10 + f[:, 1]) * 10 + f[:, 2]) * 8 + f[:, 3]) * 4 + f[:, 4]) * 15 + f[:, 5]  # row-major
    assert np.array_equal(horner, flat)
    assert np.array_equal(D.Shapes3DDataset([0, 479_999]).factors(), [[0] * 6, [s - 1 for s in SIZES]])


def test_rendering_is_deterministic_and_in_range():
    f = _random_factors(24)
    first = D.render_shapes3d(f, 32)
    assert first.dtype == np.float32 and first.shape == (24, 3, 32, 32)
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert np.array_equal(first * 255, np.rint(first * 255))  # 8-bit levels
    S3._CACHES.clear()  # geometry ray-cast again from scratch
    assert np.array_equal(first, D.render_shapes3d(f, 32))
    assert np.array_equal(first[5:6], D.render_shapes3d(f[5], 32))  # one at a time as in a batch
    assert np.array_equal(first, S3.render_shapes3d_uint8(f, 32) / np.float32(255))
    assert D.render_shapes3d(f[:2]).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("size", [32, 64], ids=["32x32", "64x64"])
def test_every_pixel_has_its_surface_hue_whatever_the_shading(size):
    f = _random_factors(200 if size == 32 else 60, seed=size)
    u8 = S3.render_shapes3d_uint8(f, size)
    hsv, tol = _hsv(u8), _hue_tolerance(u8)
    label, value = D.shapes3d_layers(f, size)
    assert set(np.unique(label)) == {0, 1, 2}  # floor, wall, object
    for surface in range(3):
        mask = label == surface
        want = np.broadcast_to(HUES[f[:, surface]][:, None, None], mask.shape)
        err = _hue_distance(hsv[..., 0], want)
        assert (err[mask] <= tol[mask]).all(), (surface, err[mask].max())
        assert np.allclose(hsv[..., 1][mask], 0.8, atol=2 / 255 / (0.35 * 0.8))  # saturation kept by the shading
    # The object is shaded (many values, light to dark) yet keeps one hue.
    obj = label == 2
    for i in range(len(f)):
        v = np.unique(u8[i].max(0)[obj[i]])
        assert v.max() - v.min() >= 40, (f[i], v)
    # Without the renderer's labels: every pixel's hue is one of the scene's three hues.
    err = np.stack([_hue_distance(hsv[..., 0], HUES[f[:, k]][:, None, None]) for k in range(3)]).min(0)
    assert (err <= tol).all()


def test_each_factor_changes_the_image():
    rng = np.random.default_rng(3)
    base = _random_factors(40, seed=3)
    images = S3.render_shapes3d_uint8(base, 32)
    for k, n in enumerate(SIZES):
        for step in (1, int(rng.integers(2, n))):
            other = base.copy()
            other[:, k] = (base[:, k] + step) % n
            changed = (images != S3.render_shapes3d_uint8(other, 32)).any(axis=(1, 2, 3))
            assert changed.all(), (D.SHAPES3D_FACTORS[k], step, base[~changed])
    # Every (scale, shape, orientation) geometry renders a different image, at both sizes.
    geometry = np.stack(np.unravel_index(np.arange(480), SIZES[3:]), axis=-1)
    f = np.concatenate([np.tile([[2, 5, 8]], (480, 1)), geometry], axis=1)
    assert len(np.unique(S3.render_shapes3d_uint8(f, 32).reshape(480, -1), axis=0)) == 480


def test_each_shape_has_its_silhouette():
    # Facing the camera (orientation 0 degrees), largest scale, at 64x64: the object's mask.
    masks = D.shapes3d_layers([[0, 0, 0, 7, s, 7] for s in range(4)], 64)[0] == 2
    rows, cols = [np.nonzero(m.any(1))[0] for m in masks], [np.nonzero(m.any(0))[0] for m in masks]
    height = np.array([r[-1] - r[0] + 1 for r in rows])
    width = np.array([c[-1] - c[0] + 1 for c in cols])
    fill = masks.sum((1, 2)) / (height * width)
    bottom = np.array([m[r[-1]].sum() for m, r in zip(masks, rows)]) / masks.sum(2).max(1)  # of the widest row
    top = np.array([m[r[0]].sum() for m, r in zip(masks, rows)]) / masks.sum(2).max(1)
    cube, cylinder, sphere, capsule = range(4)
    assert bottom[cube] > 0.8 and top[cube] > 0.6  # straight bottom and top edges, nearly as wide as the cube
    assert bottom[cylinder] < 0.5 and top[cylinder] < 0.5  # base and top are ellipses seen from above
    assert abs(fill[sphere] - np.pi / 4) < 0.05 and abs(width[sphere] - height[sphere]) <= 2  # a disc
    assert width[capsule] >= 2 * height[capsule]  # a pill lying across the view, 3a long and 1.2a thick
    assert fill[cube] > 0.9 and fill[capsule] < fill[cube]


def test_bad_factors_are_refused():
    with pytest.raises(ValueError, match=r"factor indices must be \(N, 6\)"):
        D.render_shapes3d([0, 0, 0, 0, 0, 15])
    with pytest.raises(ValueError, match=r"factor indices must be \(N, 6\)"):
        D.render_shapes3d([[0, 0, 0, 0, 0]])
    with pytest.raises(D.DatasetError, match="shapes3d_size must be an integer >= 8"):
        D.load_data("shapes3d", shapes3d_size=4)


def test_load_data_splits_the_grid_and_gives_the_factors():
    b = D.load_data("shapes3d", batch_size=20, seed=5, shapes3d_size=32)
    assert (b.name, b.factor_names, b.factor_sizes) == ("shapes3d", D.SHAPES3D_FACTORS, SIZES)
    assert (len(b.train), len(b.test), b.image_shape) == (
        480_000 - D.SHAPES3D_TEST_SIZE,
        D.SHAPES3D_TEST_SIZE,
        (3, 32, 32),
    )
    assert b.num_classes is None and b.tensors() is None and b.value_range == (0.0, 1.0)
    everything = np.concatenate([b.train.indices, b.test.indices])
    assert np.array_equal(np.sort(everything), np.arange(480_000))
    assert np.array_equal(b.test.indices, D.load_data("shapes3d", seed=5, shapes3d_size=32).test.indices)
    assert not np.array_equal(b.test.indices, D.load_data("shapes3d", seed=6, shapes3d_size=32).test.indices)
    x, y = b.test[3]
    assert y.dtype == torch.long and y.tolist() == list(np.unravel_index(b.test.indices[3], SIZES))
    assert torch.equal(x, torch.from_numpy(D.render_shapes3d(y.numpy(), 32))[0])
    xb, yb = next(iter(b.train_loader))
    assert xb.shape == (20, 3, 32, 32) and xb.dtype == torch.float32 and yb.shape == (20, 6)
    assert torch.equal(xb, torch.from_numpy(D.render_shapes3d(yb.numpy(), 32)))
    assert D.load_data("shapes3d", batch_size=2).image_shape == (3, 64, 64)


def test_presets_fit_the_data():
    assert P.get_preset("shapes3d").model.image_shape == (3, 64, 64)
    assert P.get_preset("shapes3d-32").model.image_shape == (3, 32, 32)
    assert (P.default_preset_name("shapes3d", False), P.default_preset_name("shapes3d", True)) == (
        "shapes3d-32",
        "shapes3d",
    )


def test_cli_trains_on_shapes3d(tmp_path):
    run = tmp_path / "run"
    args = ["--model", "vlae", "--dataset", "shapes3d", "--preset", "shapes3d-32", "--num-steps", "2"]
    args += ["--batch-size", "4", "--log-every", "1", "--run-dir", str(run), "--no-progress", "--no-figures"]
    out = subprocess.run(
        [sys.executable, "-m", "pyro_vlae.run", *args, "--no-eval"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        timeout=HANG_S,
    )
    assert out.returncode == 0, out.stderr
    assert "trained 2 steps" in out.stdout and (run / "checkpoints" / "latest.pt").is_file()
