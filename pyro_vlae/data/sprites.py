"""Procedural dSprites-style images with ground-truth factors, rendered on access (used by ``pyro_vlae.data``).

Factors: shape {square, ellipse, heart}; scale, 6 values from 0.5 to 1.0; orientation, 40 values over [0, 2 pi];
x and y position, 32 values each: 737,280 images in all, each a pure function of its factor indices.
"""

from __future__ import annotations

import numpy as np

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


def render_sprites(factors, size: int = 64) -> np.ndarray:
    """Rasterise sprites from factor indices, vectorised over items.

    :param factors: integer array ``(N, 5)`` or ``(5,)`` of indices into :func:`sprites_factor_values`.
    :param size: output height and width in pixels.
    :return: float32 ``(N, 1, size, size)`` array of 0s and 1s; a pixel is on when its centre lies in the shape.
    """
    f = np.atleast_2d(np.asarray(factors, dtype=np.int64))
    if f.shape[1:] != (5,) or (f < 0).any() or (f >= np.array(SPRITES_SIZES)).any():
        raise ValueError(f"factor indices must be (N, 5) within {SPRITES_SIZES}, got {f.shape}")
    v = {k: val[f[:, i]][:, None, None] for i, (k, val) in enumerate(sprites_factor_values().items())}
    half, theta, span = v["scale"] * _SPRITE_HALF, v["orientation"], 1 - 2 * _SPRITE_MARGIN
    grid = (np.arange(size) + 0.5) / size
    dx = grid[None, None, :] - (_SPRITE_MARGIN + span * v["pos_x"])  # pixel centres relative to the shape centre
    dy = grid[None, :, None] - (_SPRITE_MARGIN + span * v["pos_y"])
    a = (np.cos(theta) * dx + np.sin(theta) * dy) / half  # shape frame: a along the shape's axis, b across it
    b = (np.cos(theta) * dy - np.sin(theta) * dx) / half
    square = np.maximum(np.abs(a), np.abs(b)) <= 1
    ellipse = a**2 + (2 * b) ** 2 <= 1
    hx, hy = 1.2 * a, 0.1 - 1.2 * b  # implicit heart (x^2 + y^2 - 1)^3 <= x^2 y^3, pointing down
    heart = (hx**2 + hy**2 - 1) ** 3 <= hx**2 * hy**3
    img = np.where(v["shape"] == 0, square, np.where(v["shape"] == 1, ellipse, heart))
    return img.astype(np.float32)[:, None]


class SpritesDataset(FactorGridDataset):
    """Sprites rendered on access: item ``i`` is ``(x, factor_indices)`` of flat grid index ``indices[i]``.

    :param indices: flat row-major indices into the factor grid of sizes :data:`SPRITES_SIZES`.
    :param size: image height and width.
    """

    factor_sizes = SPRITES_SIZES
    render = staticmethod(render_sprites)


__all__ = [
    "SPRITES_FACTORS",
    "SPRITES_SHAPES",
    "SPRITES_SIZES",
    "SpritesDataset",
    "render_sprites",
    "sprites_factor_values",
]
