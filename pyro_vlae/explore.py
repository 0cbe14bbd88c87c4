"""Interactive explorer of a trained model's layers: ``python -m pyro_vlae.explore RUN_DIR`` (or a pretrained name).

A matplotlib window shows one 2-D pad per latent layer, from the top layer on the left to the bottom one on the right,
and a grid of mean images.  Every image of the grid shares the codes of the *set* layers; each *free* layer has a
draw of its own per image, from the prior ``N(0, I)`` (for a stacked HVAE, the layer's noise ``eps_l``).

* left click on a pad: set that layer's code to the clicked point (dimensions 0 and 1 of a wider code; the others
  stay at 0) and redraw the grid;
* right click on a pad: free that layer again;
* ``r``: new draws of every free layer;  ``c``: free every layer.

``--save FILE`` writes the current view (after any ``--set z3=x,y``) to a PNG without opening a window.
Examples::

    python -m pyro_vlae.explore vlae-mnist
    python -m pyro_vlae.explore runs/vlae_mnist_seed0_... --set z3=1.5,-0.5 --save view.png
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
import torch
from pyro import poutine
from torchvision.utils import make_grid

from .experiments.interventions import eval_mode, latent_shapes, noise_model
from .training.checkpoint import CheckpointError, atomic_write_bytes

HELP = "left click: set a layer's code   right click: free it   r: resample the free layers   c: free all"


class Explorer:
    """The explorer's state and its matplotlib figure; the callbacks are plain methods, so tests can drive them.

    :param model: a pyro_vlae model (put in eval mode while drawing).
    :param grid: images per side of the sample grid.
    :param span: half-width of every pad, in prior standard deviations.
    :param seed: seed of the free layers' draws.
    :param figure: a ``matplotlib.figure.Figure`` to draw in (default: a new pyplot figure).
    """

    def __init__(self, model, grid: int = 6, span: float = 3.0, seed: int = 0, figure=None):
        if grid < 1 or not span > 0:
            raise ValueError(f"grid must be >= 1 and span > 0, got grid={grid}, span={span}")
        self.model, self.grid, self.span = model, int(grid), float(span)
        self.wrapped, self.noise_sites = noise_model(model)
        self.shapes = {s: shp[0] for s, shp in latent_shapes(model).items()}
        self.sites = list(reversed(list(self.shapes)))  # top layer first
        self.generator = torch.Generator().manual_seed(seed)
        self.fixed: dict = {}
        self.draws: dict = {}
        self.resample()
        if figure is None:
            import matplotlib.pyplot as plt

            figure = plt.figure(figsize=(2.5 * len(self.sites) + 4.0, 3.8))
        self.figure = figure
        self._layout()
        self.figure.canvas.mpl_connect("button_press_event", self.on_click)
        self.figure.canvas.mpl_connect("key_press_event", self.on_key)
        self.redraw()

    # ---- state ----------------------------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return self.grid * self.grid

    def resample(self) -> None:
        """New prior draws, one per image, for every layer (used by the free ones)."""
        n = self.num_images
        self.draws = {s: torch.randn(n, d, generator=self.generator) for s, d in self.shapes.items()}

    def set_code(self, site: str, code) -> None:
        """Set layer ``site`` to ``code`` (its first ``len(code)`` dimensions; the rest are 0)."""
        if site not in self.shapes:
            raise ValueError(f"unknown layer {site!r}; the layers are {', '.join(self.shapes)}")
        code = torch.as_tensor(code, dtype=torch.float32).reshape(-1)
        d = self.shapes[site]
        if code.numel() < 1 or code.numel() > d:
            raise ValueError(f"{site} has {d} dimension(s); got a code of {code.numel()} values")
        full = torch.zeros(d)
        full[: code.numel()] = code
        self.fixed[site] = full

    def free(self, site: str) -> None:
        self.fixed.pop(site, None)

    def codes(self) -> dict:
        """``{site: (N, d)}``: the set code, repeated, for set layers; the per-image draws for free ones."""
        n = self.num_images
        return {s: self.fixed[s].expand(n, -1) if s in self.fixed else self.draws[s] for s in self.shapes}

    @torch.no_grad()
    def images(self) -> torch.Tensor:
        """Mean images ``(N, C, H, W)`` of the current codes (deterministic given them)."""
        dev = next(self.model.parameters()).device
        data = {self.noise_sites[s]: c.to(dev) for s, c in self.codes().items()}
        with eval_mode(self.model):
            out = poutine.condition(self.wrapped, data=data)(batch_size=self.num_images)
        return out.detach().float().cpu()

    # ---- figure ---------------------------------------------------------------------------------------------------
    def _layout(self) -> None:
        fig, k = self.figure, len(self.sites)
        gs = fig.add_gridspec(1, k + 2, width_ratios=[1] * k + [0.15, 1.6], left=0.04, right=0.98, top=0.84)
        self.pads = {}
        for i, site in enumerate(self.sites):
            ax = fig.add_subplot(gs[0, i])
            ax.set_xlim(-self.span, self.span)
            ax.set_ylim(-self.span, self.span)
            ax.set_aspect("equal")
            ax.set_title(f"{site}" + (" (top)" if i == 0 else " (bottom)" if i == k - 1 else ""), fontsize=10)
            ax.tick_params(labelsize=7)
            self.pads[site] = ax
        self.grid_ax = fig.add_subplot(gs[0, k + 1])
        self.grid_ax.axis("off")
        fig.suptitle(HELP, fontsize=8)

    def redraw(self) -> None:
        t = np.linspace(0, 2 * np.pi, 100)
        for site, ax in self.pads.items():
            for artist in list(ax.lines) + list(ax.collections):
                artist.remove()
            for r in (1, 2):
                ax.plot(r * np.cos(t), r * np.sin(t), color="0.85", lw=0.8)
            d = self.shapes[site]
            draws = self.draws[site].numpy()
            ys = draws[:, 1] if d > 1 else np.zeros(len(draws))
            if site in self.fixed:
                c = self.fixed[site]
                ax.plot([c[0].item()], [c[1].item() if d > 1 else 0.0], "o", color="tab:red", ms=8)
                ax.set_xlabel("set", fontsize=8, color="tab:red")
            else:
                ax.scatter(draws[:, 0], ys, s=6, color="tab:blue", alpha=0.5)
                ax.set_xlabel("free: one draw per image", fontsize=8, color="tab:blue")
        images = self.images().clamp(0, 1)
        grid = make_grid(images, nrow=self.grid, padding=1, pad_value=1.0)  # 3 channels, also for grey images
        arr = grid[0].numpy() if images.shape[1] == 1 else grid.permute(1, 2, 0).numpy()
        self.grid_ax.clear()
        self.grid_ax.axis("off")
        self.grid_ax.imshow(arr, cmap="gray", vmin=0, vmax=1)
        set_ = ", ".join(f"{s}=({', '.join(f'{v:.2f}' for v in self.fixed[s][:2].tolist())})" for s in self.fixed)
        self.grid_ax.set_title(f"set: {set_ or 'none'}", fontsize=9)
        self.figure.canvas.draw_idle()

    # ---- callbacks ------------------------------------------------------------------------------------------------
    def on_click(self, event) -> None:
        site = next((s for s, ax in self.pads.items() if event.inaxes is ax), None)
        if site is None or event.xdata is None:
            return
        if event.button == 3:
            self.free(site)
        else:
            d = self.shapes[site]
            self.set_code(site, [event.xdata, event.ydata][: min(d, 2)])
        self.redraw()

    def on_key(self, event) -> None:
        if event.key == "r":
            self.resample()
        elif event.key == "c":
            self.fixed.clear()
        else:
            return
        self.redraw()

    def save(self, path: str, dpi: int = 110) -> str:
        """Write the current view to ``path`` (PNG, atomic)."""
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=dpi)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
        return path


def load_source(source: str, device: str = "cpu"):
    """The model of a run folder, or of a shipped pretrained entry."""
    from . import pretrained

    if os.path.isdir(source):
        from .training.runs import load_run

        return load_run(source, device)[0]
    if source in pretrained.available():
        return pretrained.load_pretrained(source, device)[0]
    raise ValueError(
        f"{source!r} is neither a run folder nor a pretrained name; pass RUN_DIR or one of "
        f"{', '.join(pretrained.available())}"
    )


def _parse_set(text: str) -> tuple:
    site, sep, values = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return site, [float(v) for v in values.split(",")]
    except ValueError:
        raise ValueError(f"--set {text!r}: expected LAYER=X,Y such as z3=1.5,-0.5") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyro_vlae.explore", description=__doc__.split("\n\n")[0])
    p.add_argument("source", metavar="RUN_DIR|NAME", help="a run folder, or a pretrained name such as vlae-mnist")
    p.add_argument("--save", metavar="FILE", help="write the view to FILE (PNG) without opening a window")
    p.add_argument("--set", action="append", default=[], metavar="LAYER=X,Y", help="set a layer's code (repeatable)")
    p.add_argument("--grid", type=int, default=6, help="images per side of the grid (default: 6)")
    p.add_argument("--span", type=float, default=3.0, help="half-width of the pads (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the free layers' draws")
    p.add_argument("--device", default="cpu")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sets = [_parse_set(s) for s in args.set]
        if args.save:
            import matplotlib

            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        model = load_source(args.source, args.device)
        ex = Explorer(model, grid=args.grid, span=args.span, seed=args.seed)
        for site, code in sets:
            ex.set_code(site, code)
        ex.redraw()
        if args.save:
            print(ex.save(args.save))
            plt.close(ex.figure)
        else:
            plt.show()
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
