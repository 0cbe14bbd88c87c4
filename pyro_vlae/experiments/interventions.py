"""Per-layer noise interventions, resampling grids and latent traversals (paper Fig. 3, 5, 6 and 7).

Everything here works through Pyro handlers on an unmodified model: ``poutine.condition`` fixes codes, and for the
stacked HVAE ``poutine.reparam`` with ``LocScaleReparam(0)`` rewrites every ``z_l ~ N(mu, sigma)`` as
``z_l = mu + sigma * eps_l`` with a site ``z{l}_decentered`` for the noise ``eps_l ~ N(0, I)`` (Section 3.2).
For the VLAE (and the flat VAE) the codes ``z_l`` are already the noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from pyro import poutine
from pyro.infer.reparam import LocScaleReparam
from pyro.nn import PyroModule


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(*modules):
    """Put every ``nn.Module`` among ``modules`` in eval mode (batch norm uses its running statistics, so rows of a
    batch are independent), and restore the previous modes afterwards.  Plain callables are left alone."""
    saved = [(m, m.training) for m in modules if hasattr(m, "training") and hasattr(m, "train")]
    for m, _ in saved:
        m.eval()
    try:
        yield
    finally:
        for m, was in saved:
            m.train(was)


def latent_sites(model: PyroModule) -> list[str]:
    """``["z1", ..., "zL"]`` of a pyro_vlae model, bottom layer first.

    >>> import pyro_vlae as pv
    >>> model, guide = pv.load_pretrained("vlae-mnist")
    >>> pv.latent_sites(model)
    ['z1', 'z2', 'z3']
    """
    return list(model.latent_sites)


def latent_shapes(model: PyroModule) -> dict[str, tuple[int, ...]]:
    """Event size of every latent site, read from one traced prior draw (hidden from handlers outside this call).

    The draw uses a forked random stream, so the caller's stream is untouched.

    >>> import pyro_vlae as pv
    >>> model, guide = pv.load_pretrained("vlae-mnist")
    >>> pv.latent_shapes(model)
    {'z1': (2,), 'z2': (2,), 'z3': (2,)}
    """
    dev = _device(model)
    forked = [dev] if dev.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=forked), eval_mode(model), poutine.block():
        tr = poutine.trace(model).get_trace(batch_size=1)
    return {s: tuple(tr.nodes[s]["value"].shape[1:]) for s in latent_sites(model)}


def fix_layers(model: PyroModule, codes: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``poutine.condition(model, data=codes)`` after checking every site exists and every code has its shape.

    Codes may be ``(d,)`` (shared by the batch) or ``(N, d)``.  A shared code is expanded on each call, and codes are
    moved to the model's device.  The returned callable takes the model's arguments (``batch_size=`` or ``x``).

    :param model: a pyro_vlae model.
    :param codes: ``{site: code}`` for the layers to fix; the other layers are drawn from the model.
    :returns: the conditioned model; it returns the mean images.
    :raises ValueError: naming the valid sites and their shapes.

    Sixteen digits that share their top-layer code, the lower layers drawn from the prior:

    >>> import torch
    >>> import pyro_vlae as pv
    >>> model, guide = pv.load_pretrained("vlae-mnist")
    >>> same_top = pv.fix_layers(model, {"z3": torch.tensor([1.5, -0.5])})
    >>> tuple(same_top(batch_size=16).shape)
    (16, 1, 28, 28)
    >>> pv.fix_layers(model, {"z4": torch.zeros(2)})
    Traceback (most recent call last):
    ...
    ValueError: cannot fix 'z4': the model has no such latent site; valid sites are z1: (N, 2), z2: (N, 2), z3: (N, 2)
    """
    shapes = latent_shapes(model)
    valid = ", ".join(f"{s}: (N, {', '.join(map(str, shp))})" for s, shp in shapes.items())
    for name, code in codes.items():
        if name not in shapes:
            raise ValueError(f"cannot fix {name!r}: the model has no such latent site; valid sites are {valid}")
        code = torch.as_tensor(code)
        if tuple(code.shape[-1:]) != shapes[name] or code.dim() not in (1, 2):
            raise ValueError(
                f"cannot fix {name!r}: code has shape {tuple(code.shape)}; expected (N, {shapes[name][0]}) or "
                f"({shapes[name][0]},). Valid sites and shapes: {valid}"
            )

    def conditioned(*args, batch_size=None, **kwargs):
        x = args[0] if args else kwargs.get("x")
        n = x.shape[0] if x is not None else (batch_size or 1)
        dev = _device(model)
        data = {}
        for name, code in codes.items():
            code = torch.as_tensor(code).to(dev)
            if code.dim() == 2 and code.shape[0] != n:
                raise ValueError(f"{name} holds {code.shape[0]} codes but the batch has {n} items")
            data[name] = code.expand(n, -1) if code.dim() == 1 else code
        kw = dict(kwargs)
        if x is None:
            kw["batch_size"] = n
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


def _noise_draws(model, layer, num_groups, num_samples, generator) -> dict:
    """Noise for :func:`intervene_layer`: fresh for ``layer`` at every item, shared by a row for the other layers."""
    wrapped, noise = noise_model(model)
    if layer not in noise:
        raise ValueError(f"unknown layer {layer!r}; valid layers are {list(noise)}")
    shapes = latent_shapes(model)
    n = num_groups * num_samples
    dev = _device(model)
    data = {}
    for site, nsite in noise.items():
        d = shapes[site][0]
        if site == layer:
            data[nsite] = torch.randn(n, d, generator=generator).to(dev)
        else:
            draw = torch.randn(num_groups, 1, d, generator=generator).to(dev)
            data[nsite] = draw.expand(num_groups, num_samples, d).reshape(n, d)
    return data


@torch.no_grad()
def intervene_layer(
    model: PyroModule,
    layer: str,
    num_groups: int = 8,
    num_samples: int = 8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fig. 3 / 6 / 7: fix the noise of every layer but ``layer`` and resample that one.

    Row ``g`` shares one draw of every other layer's noise; its ``num_samples`` columns differ only in ``layer``.  For
    the stacked HVAE the noise is ``eps_l`` of ``z_l = mu_l(z_{l+1}) + sigma_l(z_{l+1}) * eps_l`` (Section 3.2), so
    resampling ``eps_l`` changes ``z_l`` and every layer below it; for the VLAE the noise is ``z_l`` itself.
    Runs in eval mode.

    :param model: a pyro_vlae model.
    :param layer: the site to resample, e.g. ``"z2"``.
    :param num_groups: rows (independent draws of the other layers).
    :param num_samples: columns (draws of ``layer`` per row).
    :param generator: torch generator for the noise.
    :returns: mean images of shape ``(num_groups, num_samples, C, H, W)``.

    >>> import torch
    >>> import pyro_vlae as pv
    >>> model, guide = pv.load_pretrained("vlae-mnist")
    >>> grid = pv.intervene_layer(model, "z2", num_groups=4, num_samples=6, generator=torch.Generator().manual_seed(0))
    >>> tuple(grid.shape)  # 4 rows, each sharing z1 and z3; its 6 columns differ in z2 only
    (4, 6, 1, 28, 28)
    """
    data = _noise_draws(model, layer, num_groups, num_samples, generator)
    wrapped, _ = noise_model(model)
    with eval_mode(model):
        images = poutine.condition(wrapped, data=data)(batch_size=num_groups * num_samples)
    return images.reshape(num_groups, num_samples, *images.shape[1:])


def variance_share(model: PyroModule, num_groups: int = 32, num_samples: int = 16, seed: int = 0) -> dict[str, float]:
    """For each layer, the share of pixel variance caused by resampling that layer alone.

    ``share_l = E_groups[Var_within(x)] / Var_total(x)``, pixel variances of the mean images averaged over pixels; the
    total variance is that of fully independent ancestral samples (all layers resampled).  Shares need not add up
    to 1: the layers interact through the decoder.  Runs in eval mode.

    :param model: a pyro_vlae model.
    :param num_groups: groups, each sharing the other layers' noise.
    :param num_samples: draws of the resampled layer per group.
    :param seed: seed of the noise (the global random stream is not used for it).
    :returns: ``{site: share}``.

    >>> import pyro_vlae as pv
    >>> model, guide = pv.load_pretrained("vlae-mnist")
    >>> shares = pv.variance_share(model, num_groups=8, num_samples=4)
    >>> sorted(shares)
    ['z1', 'z2', 'z3']
    >>> max(shares, key=shares.get)  # the top layer moves the image most
    'z3'
    """
    g = torch.Generator().manual_seed(seed)
    wrapped, noise = noise_model(model)
    shapes = latent_shapes(model)
    n = num_groups * num_samples
    dev = _device(model)
    with torch.no_grad(), eval_mode(model):
        free = {ns: torch.randn(n, shapes[s][0], generator=g).to(dev) for s, ns in noise.items()}
        total = poutine.condition(wrapped, data=free)(batch_size=n).var(dim=0).mean().item()
    out = {}
    for site in noise:
        imgs = intervene_layer(model, site, num_groups, num_samples, generator=g)
        within = imgs.var(dim=1).mean().item()
        out[site] = within / total if total > 0 else float("nan")
    return out


@torch.no_grad()
def traverse_layer(
    model: PyroModule,
    layer: str,
    grid: int = 9,
    span: float = 2.0,
    dims: tuple[int, int] = (0, 1),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fig. 5: sweep two dimensions of ``layer``'s code over ``[-span, span]^2`` while every other layer (and the
    remaining dimensions of this one) is drawn once from the prior and shared by the whole grid.  Runs in eval mode.

    :param model: a pyro_vlae model.
    :param layer: the site to sweep.
    :param grid: points per axis.
    :param span: half-width of the sweep, in prior standard deviations.
    :param dims: the two dimensions swept (see :func:`top_kl_dims` to pick the most used ones).
    :param generator: torch generator for the shared draws.
    :returns: mean images ``(grid, grid, C, H, W)``; row index sweeps ``dims[0]``, column index ``dims[1]``.

    >>> import pyro_vlae as pv
    >>> model, guide = pv.load_pretrained("vlae-mnist")
    >>> sweep = pv.traverse_layer(model, "z3", grid=5, span=2.0)  # z3 over [-2, 2]^2, z1 and z2 drawn once
    >>> tuple(sweep.shape)
    (5, 5, 1, 28, 28)
    """
    wrapped, noise = noise_model(model)
    if layer not in noise:
        raise ValueError(f"unknown layer {layer!r}; valid layers are {list(noise)}")
    shapes = latent_shapes(model)
    d = shapes[layer][0]
    if d < 2:
        raise ValueError(f"{layer} has {d} dimension(s); a 2-D traversal needs at least 2")
    if len(dims) != 2 or dims[0] == dims[1] or not all(0 <= int(k) < d for k in dims):
        raise ValueError(f"dims must be two different dimensions of {layer} in [0, {d}), got {tuple(dims)}")
    n = grid * grid
    dev = _device(model)
    data = {}
    for site, nsite in noise.items():
        draw = torch.randn(1, shapes[site][0], generator=generator).to(dev)
        data[nsite] = draw.expand(n, -1).clone()
    ticks = torch.linspace(-span, span, grid, device=dev)
    data[noise[layer]][:, dims[0]] = ticks.repeat_interleave(grid)
    data[noise[layer]][:, dims[1]] = ticks.repeat(grid)
    with eval_mode(model):
        images = poutine.condition(wrapped, data=data)(batch_size=n)
    return images.reshape(grid, grid, *images.shape[1:])


@torch.no_grad()
def kl_per_dim(model: PyroModule, guide: PyroModule, x: torch.Tensor, layer: str, num_samples: int = 1) -> torch.Tensor:
    """Average KL per dimension of ``layer`` over the images ``x``, in nats; sums to the layer's KL term of Eq. 5.

    For the VLAE and VAE, whose prior is ``N(0, I)`` and whose ``q(z_l|x)`` is a diagonal Gaussian, it is the closed
    form ``KL(q(z_{l,i}|x) || N(0, 1))``.  For the stacked HVAEs, where ``p(z_l|z_{l+1})`` depends on a sampled layer,
    it is the Monte Carlo average of ``log q(z_{l,i}|.) - log p(z_{l,i}|.)`` over ``num_samples`` draws per image.
    Runs in eval mode.

    :param model: a pyro_vlae model.
    :param guide: its guide.
    :param x: images ``(N, C, H, W)`` (moved to the model's device).
    :param layer: the latent site.
    :param num_samples: draws per image (stacked models only).
    :returns: ``(d,)`` tensor on the CPU.

    >>> import pyro_vlae as pv
    >>> model, guide = pv.load_pretrained("vlae-mnist")
    >>> x = pv.ancestral_means(model, 64, seed=0)  # any images (N, 1, 28, 28); here the model's own
    >>> kl = pv.kl_per_dim(model, guide, x, "z3")
    >>> tuple(kl.shape), bool((kl > 0).all())
    ((2,), True)
    """
    if layer not in latent_sites(model):
        raise ValueError(f"unknown layer {layer!r}; valid layers are {latent_sites(model)}")
    x = x.to(_device(model))
    stacked = _is_stacked(model)
    if stacked and num_samples > 1:
        x = x.repeat(num_samples, *([1] * (x.dim() - 1)))
    with eval_mode(model, guide):
        gtr = poutine.trace(guide).get_trace(x)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(x)
    q, p = gtr.nodes[layer]["fn"].base_dist, mtr.nodes[layer]["fn"].base_dist
    if stacked:
        z = gtr.nodes[layer]["value"]
        kl = q.log_prob(z) - p.log_prob(z)
    else:
        kl = torch.distributions.kl_divergence(q, p)
    return kl.mean(dim=0).cpu()


def top_kl_dims(model, guide, x: torch.Tensor, layer: str, k: int = 2) -> tuple:
    """The ``k`` dimensions of ``layer`` with the largest average KL (:func:`kl_per_dim`) on ``x``, largest first.

    Used to pick which two dimensions of a wide layer a 2-D traversal sweeps: dimensions with almost no KL are
    ignored by the decoder and would give a blank grid.
    """
    kl = kl_per_dim(model, guide, x, layer)
    if k > kl.numel():
        raise ValueError(f"{layer} has {kl.numel()} dimensions, fewer than k={k}")
    return tuple(int(i) for i in torch.argsort(kl, descending=True)[:k])
