"""Procedural dSprites-style images with ground-truth factors, rendered on access (used by ``pyro_vlae.data``).

Factors: shape {square, ellipse, heart}; scale, 6 values from 0.5 to 1.0; orientation, 40 values over [0, 2 pi];
x and y position, 32 values each: 737,280 images in all, each a pure function of its factor indices.
"""

from __future__ import annotations

import numpy as np
import torch

from .grid import FactorGridDataset

SPRITES_FACTORS = ("shape", "scale", "orientation", "pos_x", "pos_y")
SPRITES_SIZES = (3, 6, 40, 32, 32)
SPRITES_SHAPES = ("square", "ellipse", "heart")

_SPRITE_HALF, _SPRITE_MARGIN = 0.16, 0.24  # half-size at scale 1 and border kept free, as fractions of the image


def sprites_factor_values() -> dict:
    """Sprites factor name -> 1-D array of its values (``shape`` indexes :data:`SPRITES_SHAPES`)."""
    pos = np.linspace(0.0, 1.0, 32)
    return {
        "shape": np.arange(3.0),
        "scale": np.linspace(0.5, 1.0, 6),
        "orientation": np.linspace(0, 2 * np.pi, 40),
        "pos_x": pos,
        "pos_y": pos.copy(),
    }


def sprites_tables(size: int) -> dict:
    """Everything :func:`render_sprites` computes per factor value rather than per pixel, as float64 arrays: the
    pixel-centre coordinates ``grid`` (``size``), the shape centres ``centre`` (per position value), the half-sizes
    ``half`` (per scale value), and ``cos``/``sin`` of every orientation.  The numpy renderer and the torch renderer
    (:class:`~pyro_vlae.data.device.SpritesRenderer`) both read these, so the transcendental functions are evaluated
    once, by numpy, and the two renderers agree bit for bit."""
    v = sprites_factor_values()
    return {
        "grid": (np.arange(size) + 0.5) / size,
        "centre": _SPRITE_MARGIN + (1 - 2 * _SPRITE_MARGIN) * v["pos_x"],
        "half": v["scale"] * _SPRITE_HALF,
        "cos": np.cos(v["orientation"]),
        "sin": np.sin(v["orientation"]),
    }


def sprite_masks(a, b):
    """Square, ellipse and heart masks at shape-frame coordinates ``a`` (along the shape's axis) and ``b`` (across),
    in units of the half-size; numpy arrays or torch tensors alike.  Only ``+ - *`` and comparisons, each in the same
    order for both array types (the cubes are products, not ``** 3``, which numpy evaluates with ``pow``), so numpy
    and torch give identical masks."""
    square = (abs(a) <= 1) & (abs(b) <= 1)
    ellipse = a * a + (2 * b) * (2 * b) <= 1
    hx, hy = 1.2 * a, 0.1 - 1.2 * b  # implicit heart (x^2 + y^2 - 1)^3 <= x^2 y^3, pointing down
    c = hx * hx + hy * hy - 1
    heart = c * c * c <= (hx * hx) * (hy * hy * hy)
    return square, ellipse, heart


def sprite_frame(f: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel centre in the frame of its item's shape, in units of the half-size: ``a`` along the shape's axis,
    ``b`` across it (float64 ``(N, size, size)``), for checked factor indices ``f`` ``(N, 5)``."""
    t = sprites_tables(size)
    half = t["half"][f[:, 1]][:, None, None]
    cos, sin = t["cos"][f[:, 2]][:, None, None], t["sin"][f[:, 2]][:, None, None]
    dx = t["grid"][None, None, :] - t["centre"][f[:, 3]][:, None, None]  # pixel centres relative to the shape centre
    dy = t["grid"][None, :, None] - t["centre"][f[:, 4]][:, None, None]
    return (cos * dx + sin * dy) / half, (cos * dy - sin * dx) / half


def render_sprites(factors, size: int = 64) -> np.ndarray:
    """Rasterise sprites from factor indices, vectorised over items.

    :param factors: integer array ``(N, 5)`` or ``(5,)`` of indices into :func:`sprites_factor_values`.
    :param size: output height and width in pixels.
    :return: float32 ``(N, 1, size, size)`` array of 0s and 1s; a pixel is on when its centre lies in the shape.
    """
    f = np.atleast_2d(np.asarray(factors, dtype=np.int64))
    if f.shape[1:] != (5,) or (f < 0).any() or (f >= np.array(SPRITES_SIZES)).any():
        raise ValueError(f"factor indices must be (N, 5) within {SPRITES_SIZES}, got {f.shape}")
    square, ellipse, heart = sprite_masks(*sprite_frame(f, size))
    shape = f[:, 0, None, None]
    img = np.where(shape == 0, square, np.where(shape == 1, ellipse, heart))
    return img.astype(np.float32)[:, None]


class SpritesRenderer:
    """:func:`render_sprites` in torch, on any device, bit for bit: ``renderer(factors)`` with integer factor indices
    ``(N, 5)`` on the renderer's device gives the same float32 ``(N, 1, size, size)`` images.

    Both renderers compute in float64 from the same :func:`sprites_tables` (so ``cos`` and ``sin`` are numpy's, once)
    and the same :func:`sprite_masks`, whose ``+ - *`` run in the same order, so every rounding is the same.

    :param size: image height and width.
    :param device: where the images are drawn.
    """

    def __init__(self, size: int, device="cpu"):
        self.size, self.device = int(size), torch.device(device)
        self.tables = {k: torch.from_numpy(v).to(self.device) for k, v in sprites_tables(self.size).items()}

    def frame(self, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`sprite_frame` in torch: the same float64 ``a`` and ``b``, bit for bit."""
        t, f = self.tables, factors

        def per_item(name, column):
            return t[name][f[:, column]].view(-1, 1, 1)

        half, cos, sin = per_item("half", 1), per_item("cos", 2), per_item("sin", 2)
        dx = t["grid"].view(1, 1, -1) - per_item("centre", 3)
        dy = t["grid"].view(1, -1, 1) - per_item("centre", 4)
        return (cos * dx + sin * dy) / half, (cos * dy - sin * dx) / half

    def __call__(self, factors: torch.Tensor) -> torch.Tensor:
        square, ellipse, heart = sprite_masks(*self.frame(factors))
        shape = factors[:, 0].view(-1, 1, 1)
        return torch.where(shape == 0, square, torch.where(shape == 1, ellipse, heart)).to(torch.float32).unsqueeze(1)


class SpritesDataset(FactorGridDataset):
    """Sprites rendered on access: item ``i`` is ``(x, factor_indices)`` of flat grid index ``indices[i]``.

    :param indices: flat row-major indices into the factor grid of sizes :data:`SPRITES_SIZES`.
    :param size: image height and width.
    """

    factor_sizes = SPRITES_SIZES
    render = staticmethod(render_sprites)
    device_render = SpritesRenderer


__all__ = [
    "SPRITES_FACTORS",
    "SPRITES_SHAPES",
    "SPRITES_SIZES",
    "SpritesDataset",
    "SpritesRenderer",
    "render_sprites",
    "sprite_frame",
    "sprite_masks",
    "sprites_factor_values",
    "sprites_tables",
]
