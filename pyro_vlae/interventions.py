"""Per-layer noise interventions, resampling grids and latent traversals (paper Fig. 3, 5, 6 and 7).

Everything here works through Pyro handlers on an unmodified model: ``poutine.condition`` fixes codes, and for the
stacked HVAE ``poutine.reparam`` with ``LocScaleReparam(0)`` rewrites every ``z_l ~ N(mu, sigma)`` as
``z_l = mu + sigma * eps_l`` with a site ``z{l}_decentered`` for the noise ``eps_l ~ N(0, I)`` (Section 3.2).
For the VLAE (and the flat VAE) the codes ``z_l`` are already the noise.
"""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.infer.reparam import LocScaleReparam


def latent_sites(model) -> list:
    """``["z1", ..., "zL"]`` of a pyro_vlae model."""
    return list(model.latent_sites)


def latent_shapes(model) -> dict:
    """Event size of every latent site, read from one traced prior draw."""
    with torch.no_grad(), torch.random.fork_rng():
        tr = poutine.trace(model).get_trace(batch_size=1)
    return {s: tuple(tr.nodes[s]["value"].shape[1:]) for s in latent_sites(model)}


def fix_layers(model, codes: dict):
    """``poutine.condition(model, data=codes)`` after checking every site exists and every code has its shape.

    Codes may be ``(d,)`` (shared by the batch) or ``(N, d)``.  A shared code is expanded on each call.

    :raises ValueError: naming the valid sites and their shapes.
    """
    shapes = latent_shapes(model)
    valid = ", ".join(f"{s}: (N, {', '.join(map(str, shp))})" for s, shp in shapes.items())
    for name, code in codes.items():
        if name not in shapes:
            raise ValueError(f"cannot fix {name!r}: the model has no such latent site; valid sites are {valid}")
        code = torch.as_tensor(code)
        if tuple(code.shape[-1:]) != shapes[name] or code.dim() not in (1, 2):
            raise ValueError(
                f"cannot fix {name!r}: code has shape {tuple(code.shape)} but the site takes {valid.split(', z')[0]}"
                if False
                else f"cannot fix {name!r}: code has shape {tuple(code.shape)}; expected (N, {shapes[name][0]}) or "
                f"({shapes[name][0]},). Valid sites and shapes: {valid}"
            )

    def conditioned(*args, batch_size=None, **kwargs):
        x = args[0] if args else kwargs.get("x")
        n = x.shape[0] if x is not None else (batch_size or 1)
        data = {}
        for name, code in codes.items():
            code = torch.as_tensor(code)
            data[name] = code.expand(n, -1) if code.dim() == 1 else code
        kw = dict(kwargs)
        if x is None:
            kw["batch_size"] = batch_size
        return poutine.condition(model, data=data)(*args, **kw)

    return conditioned


def _is_stacked(model) -> bool:
    return hasattr(model, "conditionals")


def noise_model(model):
    """The model with each layer's noise exposed: reparameterised HVAE, or the model itself for VLAE/VAE.

    Returns ``(wrapped_model, {layer_site: noise_site})``.
    """
    sites = latent_sites(model)
    if _is_stacked(model):
        wrapped = poutine.reparam(model, config={s: LocScaleReparam(centered=0.0) for s in sites})
        return wrapped, {s: f"{s}_decentered" for s in sites}
    return model, {s: s for s in sites}


@torch.no_grad()
def intervene_layer(model, layer: str, num_groups: int = 8, num_samples: int = 8, generator=None) -> torch.Tensor:
    """Fig. 3 / 6 / 7: fix the noise of every layer but ``layer`` and resample that one.

    Row ``g`` shares one draw of every other layer's noise; its ``num_samples`` columns differ only in ``layer``.

    :returns: mean images of shape ``(num_groups, num_samples, C, H, W)``.
    """
    wrapped, noise = noise_model(model)
    if layer not in noise:
        raise ValueError(f"unknown layer {layer!r}; valid layers are {list(noise)}")
    shapes = latent_shapes(model)
    n = num_groups * num_samples
    dev = next(model.parameters()).device
    data = {}
    for site, nsite in noise.items():
        d = shapes[site][0]
        if site == layer:
            data[nsite] = torch.randn(n, d, generator=generator).to(dev)
        else:
            draw = torch.randn(num_groups, 1, d, generator=generator).to(dev)
            data[nsite] = draw.expand(num_groups, num_samples, d).reshape(n, d)
    images = poutine.condition(wrapped, data=data)(batch_size=n)
    return images.reshape(num_groups, num_samples, *images.shape[1:])


def variance_share(model, num_groups: int = 32, num_samples: int = 16, seed: int = 0) -> dict:
    """For each layer, the share of pixel variance caused by resampling that layer alone.

    ``share_l = E_groups[Var_within(x)] / Var_total(x)``, pixel variances averaged over pixels; the total variance is
    that of fully independent ancestral samples (all layers resampled).
    """
    g = torch.Generator().manual_seed(seed)
    wrapped, noise = noise_model(model)
    shapes = latent_shapes(model)
    n = num_groups * num_samples
    dev = next(model.parameters()).device
    with torch.no_grad():
        free = {ns: torch.randn(n, shapes[s][0], generator=g).to(dev) for s, ns in noise.items()}
        total = poutine.condition(wrapped, data=free)(batch_size=n).var(dim=0).mean().item()
    out = {}
    for site in noise:
        imgs = intervene_layer(model, site, num_groups, num_samples, generator=g)
        within = imgs.var(dim=1).mean().item()
        out[site] = within / total if total > 0 else float("nan")
    return out


@torch.no_grad()
def traverse_layer(model, layer: str, grid: int = 9, span: float = 2.0, dims=(0, 1), generator=None) -> torch.Tensor:
    """Fig. 5: sweep two dimensions of ``layer``'s code over ``[-span, span]^2`` while every other layer (and the
    remaining dimensions of this one) is drawn once from the prior and shared by the whole grid.

    :returns: mean images ``(grid, grid, C, H, W)``; row index sweeps ``dims[0]``, column index ``dims[1]``.
    """
    wrapped, noise = noise_model(model)
    if layer not in noise:
        raise ValueError(f"unknown layer {layer!r}; valid layers are {list(noise)}")
    shapes = latent_shapes(model)
    d = shapes[layer][0]
    if d < 2:
        raise ValueError(f"{layer} has {d} dimension(s); a 2-D traversal needs at least 2")
    n = grid * grid
    dev = next(model.parameters()).device
    data = {}
    for site, nsite in noise.items():
        draw = torch.randn(1, shapes[site][0], generator=generator).to(dev)
        data[nsite] = draw.expand(n, -1).clone()
    ticks = torch.linspace(-span, span, grid, device=dev)
    data[noise[layer]][:, dims[0]] = ticks.repeat_interleave(grid)
    data[noise[layer]][:, dims[1]] = ticks.repeat(grid)
    images = poutine.condition(wrapped, data=data)(batch_size=n)
    return images.reshape(grid, grid, *images.shape[1:])
