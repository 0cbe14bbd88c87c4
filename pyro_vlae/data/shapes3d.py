"""Procedural 3D Shapes-style colour scenes with ground-truth factors, rendered on access (used by ``pyro_vlae.data``).

In the spirit of 3D Shapes (Burgess & Kim, 2018), without its download. Factors: floor hue, wall hue and object hue,
10 values each evenly spaced in [0, 1); scale, 8 values from 0.75 to 1.25; shape {cube, cylinder, sphere, capsule};
orientation, 15 camera azimuths from -30 to 30 degrees: 480,000 scenes, each a pure function of its factor indices.

A scene is a floor, a back wall and one object standing on the floor, seen by a pinhole camera that orbits the
object's vertical axis (so the orientation turns the whole view, as in 3D Shapes, and changes even a sphere's image).
Each pixel shows the first surface its central ray meets (no anti-aliasing, so every pixel belongs to one surface) and
is shaded by a directional light (Lambert with an ambient term) with cast shadows. The shading scales only the HSV
value: a pixel of a surface of hue ``h`` is ``hsv_to_rgb(h, SATURATION, v)``, so its hue stays ``h`` up to the 8-bit
quantisation of the output. The geometry (which surface, which value) depends only on scale, shape and orientation,
480 combinations, and is ray-cast once per combination and image size, then cached; colouring a batch is a lookup.
"""

from __future__ import annotations

import numpy as np
import torch

from .grid import FactorGridDataset

SHAPES3D_FACTORS = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
SHAPES3D_SIZES = (10, 10, 10, 8, 4, 15)
SHAPES3D_SHAPES = ("cube", "cylinder", "sphere", "capsule")
SATURATION = 0.8  # of every surface
FLOOR, WALL, OBJECT = 0, 1, 2  # surface labels; also the order of the hue factors

_LIGHT = np.array([-0.5, 1.0, -0.6]) / np.linalg.norm([-0.5, 1.0, -0.6])  # towards the light: above, left, front
_AMBIENT = 0.35  # value of a surface facing away from the light or in shadow; 1 - _AMBIENT is the diffuse part
_WALL_Z, _CAM_DIST, _CAM_HEIGHT, _TARGET_Y, _TAN_HALF_FOV = 2.0, 4.6, 2.4, 0.55, np.tan(np.radians(16))
_HALF = 0.5  # object half-size at scale 1
_EPS = 1e-6


def shapes3d_factor_values() -> dict:
    """3D Shapes factor name -> 1-D array of its values (``shape`` indexes :data:`SHAPES3D_SHAPES`; orientation in
    degrees of camera azimuth)."""
    hue = np.linspace(0.0, 1.0, 10, endpoint=False)
    return {
        "floor_hue": hue,
        "wall_hue": hue.copy(),
        "object_hue": hue.copy(),
        "scale": np.linspace(0.75, 1.25, 8),
        "shape": np.arange(4.0),
        "orientation": np.linspace(-30.0, 30.0, 15),
    }


def hue_to_rgb(hue) -> np.ndarray:
    """RGB ``(..., 3)`` of HSV ``(hue, SATURATION, 1)``; HSV value ``v`` gives ``v`` times this (hue and saturation
    kept), which is how every surface is shaded."""
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * np.asarray(hue, dtype=np.float64)[..., None]) % 6.0
    return 1.0 - SATURATION * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


# --------------------------------------------------------------------------------------------- ray casting
def _dot(a, b):
    return np.einsum("...i,...i->...", a, b)


def _sphere(o, d, centre, r):
    """First hit ``t`` (``inf`` on a miss) and outward normal of rays ``o + t d`` with a sphere."""
    oc = o - centre
    b, c = _dot(oc, d), _dot(oc, oc) - r * r
    disc = b * b - c
    t = -b - np.sqrt(np.maximum(disc, 0.0))
    t = np.where((disc >= 0) & (t > _EPS), t, np.inf)
    return t, (o + np.where(np.isfinite(t), t, 0.0)[..., None] * d - centre) / r


def _tube(o, d, r, axis, lo, hi, centre):
    """Hit of rays with the side of a cylinder of radius ``r`` along ``axis`` (0: x, 1: y) through ``centre``, kept
    where the hit's coordinate along the axis lies in ``[lo, hi]``."""
    m = np.ones(3)
    m[axis] = 0.0  # the two coordinates across the axis
    oc, dm = (o - centre) * m, d * m
    a, b, c = _dot(dm, dm), _dot(oc, dm), _dot(oc, oc) - r * r
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / np.maximum(a, 1e-12)
    along = o[..., axis] + t * d[..., axis]
    t = np.where((disc >= 0) & (a > 1e-12) & (t > _EPS) & (along >= lo) & (along <= hi), t, np.inf)
    return t, (oc + np.where(np.isfinite(t), t, 0.0)[..., None] * dm) / r


def _box(o, d, a):
    """Hit of rays with the cube ``|x|, |z| <= a``, ``0 <= y <= 2a``."""
    lo, hi = np.array([-a, 0.0, -a]), np.array([a, 2 * a, a])
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.where(d == 0, 1e-30, d)
        t1, t2 = (lo - o) * inv, (hi - o) * inv
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    t0, t1 = near.max(-1), far.min(-1)
    t = np.where((t1 >= t0) & (t0 > _EPS), t0, np.inf)
    face = near.argmax(-1)
    n = -np.sign(d) * (np.arange(3) == face[..., None])
    return t, n


def _object(o, d, shape: int, a: float):
    """First hit ``t`` and normal of rays with object ``shape`` of half-size ``a`` standing on the floor at 0."""
    if shape == 0:  # cube of side 2a
        return _box(o, d, a)
    if shape == 2:  # sphere of radius a
        return _sphere(o, d, np.array([0.0, a, 0.0]), a)
    if shape == 1:  # upright cylinder of radius a and height 2a: side and top cap
        ts, ns = _tube(o, d, a, 1, 0.0, 2 * a, np.zeros(3))
        with np.errstate(divide="ignore", invalid="ignore"):
            tc = (2 * a - o[..., 1]) / d[..., 1]
        p = o + np.where(np.isfinite(tc), tc, 0.0)[..., None] * d
        tc = np.where((tc > _EPS) & (p[..., 0] ** 2 + p[..., 2] ** 2 <= a * a), tc, np.inf)
        cap = tc < ts
        return np.where(cap, tc, ts), np.where(cap[..., None], np.array([0.0, 1.0, 0.0]), ns)
    # capsule lying along x: radius 0.6a, straight part 1.8a long, total length 3a
    r, half = 0.6 * a, 0.9 * a
    hits = [
        _tube(o, d, r, 0, -half, half, np.array([0.0, r, 0.0])),
        _sphere(o, d, np.array([-half, r, 0.0]), r),
        _sphere(o, d, np.array([half, r, 0.0]), r),
    ]
    ts = np.stack([h[0] for h in hits])
    k = ts.argmin(0)
    n = np.choose(k[..., None], [h[1] for h in hits])
    return ts.min(0), n


def _camera_rays(orientation_deg: float, size: int):
    """Origin ``(3,)`` and unit directions ``(size, size, 3)`` of the pixel-centre rays, row 0 at the top."""
    phi = np.radians(orientation_deg)
    eye = np.array([_CAM_DIST * np.sin(phi), _CAM_HEIGHT, -_CAM_DIST * np.cos(phi)])
    fwd = np.array([0.0, _TARGET_Y, 0.0]) - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross([0.0, 1.0, 0.0], fwd)
    right /= np.linalg.norm(right)
    up = np.cross(fwd, right)
    s = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    d = fwd + _TAN_HALF_FOV * (s[None, :, None] * right - s[:, None, None] * up)
    return eye, d / np.linalg.norm(d, axis=-1, keepdims=True)


def _scene_geometry(scale: float, shape: int, orientation_deg: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast one scene's geometry.

    :return: surface label per pixel (uint8 ``(size, size)``: :data:`FLOOR`, :data:`WALL`, :data:`OBJECT`) and the
        HSV value per pixel (float64 in ``[_AMBIENT, 1]``).
    """
    eye, d = _camera_rays(orientation_deg, size)
    o = np.broadcast_to(eye, d.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_floor = np.where(d[..., 1] < 0, -eye[1] / d[..., 1], np.inf)
        t_wall = np.where(d[..., 2] > 0, (_WALL_Z - eye[2]) / d[..., 2], np.inf)
    a = _HALF * scale
    t_obj, n_obj = _object(o, d, shape, a)
    label = np.where(t_floor <= t_wall, FLOOR, WALL)
    label = np.where(t_obj < np.minimum(t_floor, t_wall), OBJECT, label).astype(np.uint8)
    normal = np.where(label[..., None] == OBJECT, n_obj, np.where(label[..., None] == FLOOR, [0, 1.0, 0], [0, 0, -1.0]))
    t = np.where(label == OBJECT, t_obj, np.minimum(t_floor, t_wall))
    point = eye + t[..., None] * d
    light = np.broadcast_to(_LIGHT, d.shape)
    shadow = (label != OBJECT) & np.isfinite(_object(point, light, shape, a)[0])
    lambert = np.where(shadow, 0.0, np.clip(_dot(normal, _LIGHT), 0.0, 1.0))
    return label, _AMBIENT + (1.0 - _AMBIENT) * lambert


class _GeometryCache:
    """Labels and values of the 480 (scale, shape, orientation) geometries at one size, ray-cast on first use."""

    def __init__(self, size: int):
        n = int(np.prod(SHAPES3D_SIZES[3:]))
        self.size, self.done = size, np.zeros(n, dtype=bool)
        self.label, self.value = np.zeros((n, size, size), np.uint8), np.zeros((n, size, size), np.float32)

    def get(self, geom: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values = shapes3d_factor_values()
        for g in np.unique(geom[~self.done[geom]]):
            sc, sh, ori = np.unravel_index(g, SHAPES3D_SIZES[3:])
            label, value = _scene_geometry(values["scale"][sc], int(sh), values["orientation"][ori], self.size)
            self.label[g], self.value[g], self.done[g] = label, value, True
        return self.label[geom], self.value[geom]


_CACHES: dict[int, _GeometryCache] = {}


def _check_factors(factors) -> np.ndarray:
    f = np.atleast_2d(np.asarray(factors, dtype=np.int64))
    if f.ndim != 2 or f.shape[1] != 6 or (f < 0).any() or (f >= np.array(SHAPES3D_SIZES)).any():
        raise ValueError(f"factor indices must be (N, 6) within {SHAPES3D_SIZES}, got shape {f.shape}")
    return f


def shapes3d_layers(factors, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Surface label (uint8 ``(N, size, size)``) and HSV value (float32) of every pixel of the given scenes."""
    f, size = _check_factors(factors), int(size)
    if size not in _CACHES:
        _CACHES[size] = _GeometryCache(size)
    return _CACHES[size].get(np.ravel_multi_index(tuple(f[:, 3:].T), SHAPES3D_SIZES[3:]))


def _render_levels(factors, size: int) -> np.ndarray:
    """Rendered scenes as float32 ``(N, 3, size, size)`` holding the 8-bit levels 0..255."""
    f = _check_factors(factors)
    label, value = shapes3d_layers(f, size)
    colour = hue_to_rgb(np.linspace(0.0, 1.0, 10, endpoint=False)[f[:, :3]]) * 255.0  # (N, surface, channel)
    table = colour.astype(np.float32).transpose(2, 0, 1).reshape(3, -1)  # channel -> flat (item, surface)
    where = label + 3 * np.arange(len(f), dtype=np.intp)[:, None, None]
    out = np.empty((len(f), 3, size, size), np.float32)
    for c in range(3):
        np.multiply(table[c].take(where), value, out=out[:, c])
    return np.rint(out, out=out)


def render_shapes3d_uint8(factors, size: int = 64) -> np.ndarray:
    """Render scenes from factor indices as uint8 ``(N, 3, size, size)``; see :func:`render_shapes3d`."""
    return _render_levels(factors, size).astype(np.uint8)


def render_shapes3d(factors, size: int = 64) -> np.ndarray:
    """Render scenes from factor indices, vectorised over items.

    :param factors: integer array ``(N, 6)`` or ``(6,)`` of indices into :func:`shapes3d_factor_values`.
    :param size: output height and width in pixels.
    :return: float32 ``(N, 3, size, size)`` in ``[0, 1]``: 8-bit levels divided by 255 (as the loaders of stored
        colour datasets give them).
    """
    out = _render_levels(factors, size)
    return np.divide(out, np.float32(255), out=out)


class Shapes3DRenderer:
    """:func:`render_shapes3d` in torch, on any device, bit for bit: ``renderer(factors)`` with integer factor indices
    ``(N, 6)`` on the renderer's device gives the same float32 ``(N, 3, size, size)`` images.

    The whole geometry cache (480 label and value maps; the numpy ray casting takes about 2.5 s at 64 px and 1.2 s at
    32 px, once per process and size) is copied to the device at construction; a batch is then gathers, one multiply
    and one division.  Every step that could round differently from numpy is shared or is the same float32 operation:
    the value maps are the numpy cache's float32 values; the colours are numpy's float32 ``hue_to_rgb(hue) * 255``
    per hue; a float32 product is rounded to nearest in both; ``torch.round`` is ``np.rint`` (ties to even); the
    level is divided by 255 as a float32 division on the CPU, by a 0-dim tensor and never a Python number (a CUDA
    division by a host scalar multiplies by the reciprocal, which differs for 126 of the 256 levels), and on other
    devices it is looked up in numpy's 256 quotients, exact by construction.

    :param size: image height and width.
    :param device: where the cache lives and the images are drawn.
    """

    def __init__(self, size: int, device="cpu"):
        self.size, self.device = int(size), torch.device(device)
        geom = np.zeros((int(np.prod(SHAPES3D_SIZES[3:])), 6), np.int64)
        geom[:, 3:] = np.stack(np.unravel_index(np.arange(len(geom)), SHAPES3D_SIZES[3:]), axis=-1)
        label, value = shapes3d_layers(geom, self.size)  # geometry g at row g
        self.label = torch.from_numpy(label.reshape(len(geom), 1, -1)).to(self.device, torch.int64)
        self.value = torch.from_numpy(value).to(self.device)
        colour = (hue_to_rgb(np.linspace(0.0, 1.0, 10, endpoint=False)) * 255.0).astype(np.float32)
        self.colour = torch.from_numpy(colour).to(self.device)  # (hue index, channel), as _render_levels has it
        self.quotients = torch.from_numpy(np.arange(256, dtype=np.float32) / np.float32(255)).to(self.device)
        self.divisor = torch.tensor(255.0, device=self.device)
        self.strides = [int(np.prod(SHAPES3D_SIZES[4 + k :])) for k in range(2)]  # of scale and shape

    def __call__(self, factors: torch.Tensor) -> torch.Tensor:
        f, n, s = factors, factors.shape[0], self.size
        geom = f[:, 3] * self.strides[0] + f[:, 4] * self.strides[1] + f[:, 5]
        colour = self.colour[f[:, :3]].transpose(1, 2)  # (N, channel, surface)
        label = torch.index_select(self.label, 0, geom).expand(n, 3, s * s)
        levels = torch.gather(colour, 2, label).view(n, 3, s, s)
        levels.mul_(torch.index_select(self.value, 0, geom).unsqueeze(1)).round_()
        return self.unit(levels)

    def unit(self, levels: torch.Tensor, lookup: bool | None = None) -> torch.Tensor:
        """The 8-bit ``levels`` (float32) divided by 255 as numpy's float32 division gives them: in place by a 0-dim
        tensor on the CPU, by a lookup elsewhere (``lookup`` forces one way)."""
        if lookup is None:
            lookup = self.device.type != "cpu"
        return self.quotients[levels.int()] if lookup else levels.div_(self.divisor)


class Shapes3DDataset(FactorGridDataset):
    """The scenes at flat row-major grid positions ``indices`` (of the grid :data:`SHAPES3D_SIZES`), rendered at
    ``size`` x ``size`` when read; an item is ``(x, factor_indices)``."""

    factor_sizes = SHAPES3D_SIZES
    render = staticmethod(render_shapes3d)
    device_render = Shapes3DRenderer


__all__ = [
    "SHAPES3D_FACTORS",
    "SHAPES3D_SHAPES",
    "SHAPES3D_SIZES",
    "Shapes3DDataset",
    "Shapes3DRenderer",
    "render_shapes3d",
    "render_shapes3d_uint8",
    "shapes3d_factor_values",
    "shapes3d_layers",
]
