"""Image grids and figure files.  Every figure is rendered off-screen (Agg) and written atomically."""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .training.checkpoint import atomic_write_bytes  # noqa: E402


def image_grid(images, nrow: int, pad: int = 1, value_range=(0.0, 1.0)) -> np.ndarray:
    """Tile ``images`` (N, C, H, W) into an array (rows*H, nrow*W[, 3]) with ``pad`` pixels of white between tiles."""
    x = images.detach().float().cpu() if torch.is_tensor(images) else torch.as_tensor(images, dtype=torch.float32)
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    n, c, h, w = x.shape
    rows = -(-n // nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = x[i]
    arr = grid.numpy()
    return arr[0] if c == 1 else np.transpose(arr, (1, 2, 0))


def save_panels(path: str, panels, title: str | None = None, panel_width: float = 4.0, dpi: int = 110) -> str:
    """Write a figure of side-by-side panels, each ``(subtitle, images, nrow)``, to ``path`` (PNG, atomic)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), panel_width + 0.6), squeeze=False)
    for ax, (subtitle, images, nrow) in zip(axes[0], panels):
        grid = image_grid(images, nrow)
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(subtitle, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
