"""The figures a run writes under ``figures/``: reconstructions, prior samples, per-layer interventions,
traversals and the Gibbs chain of Fig. 2.  Each is a plain function of a trained model; :func:`write_figures` writes
them all."""

from __future__ import annotations

import os

import torch

from .experiments import gibbs as gb
from .experiments import interventions as iv
from .plotting import save_panels


def _name(config) -> str:
    return {"vlae": "VLAE", "hvae": "Markov HVAE", "hvae-ar": "autoregressive HVAE", "vae": "VAE"}[config.model_kind]


@torch.no_grad()
def reconstructions(path, model, guide, x, config) -> str:
    """Data (left) beside reconstructions from the posterior mean codes (right)."""
    from pyro import poutine

    tr = poutine.trace(guide).get_trace(x)
    codes = {s: tr.nodes[s]["fn"].mean for s in model.latent_sites}
    recon = poutine.condition(model, data=codes)(batch_size=x.shape[0])
    nrow = 8
    return save_panels(
        path,
        [("test images", x, nrow), ("reconstructions (posterior means)", recon, nrow)],
        f"{_name(config)} on {config.dataset}: reconstructions",
    )


@torch.no_grad()
def prior_samples(path, model, config, n=64) -> str:
    """Mean images of ``n`` ancestral samples from the prior."""
    return save_panels(
        path,
        [("mean of p(x|z), z ~ prior", model(batch_size=n), 8)],
        f"{_name(config)} on {config.dataset}: prior samples",
        panel_width=5.0,
    )


def intervention_figures(folder, model, config, groups=8, samples=8, seed=0) -> list:
    """``intervention_layer{l}.png`` for every layer, plus one ``interventions.png`` with all layers side by side."""
    g = torch.Generator().manual_seed(seed)
    panels, paths = [], []
    for l, site in enumerate(model.latent_sites, start=1):
        imgs = iv.intervene_layer(model, site, groups, samples, generator=g)
        flat = imgs.reshape(-1, *imgs.shape[2:])
        title = f"resample {'eps' if iv._is_stacked(model) else 'z'}{l} only"
        panels.append((title, flat, samples))
        paths.append(
            save_panels(
                os.path.join(folder, f"intervention_layer{l}.png"),
                [(f"each row: other layers fixed; columns: new draws of layer {l}", flat, samples)],
                f"{_name(config)}: resampling layer {l} ({site}) alone",
                panel_width=5.0,
            )
        )
    paths.append(
        save_panels(
            os.path.join(folder, "interventions.png"),
            panels,
            f"{_name(config)} on {config.dataset}: per-layer resampling (rows share all other layers)",
        )
    )
    return paths


def traversal_figures(folder, model, config, grid=9, span=2.0, seed=0, dims=None) -> list:
    """``traversal_layer{l}.png``: a 2-D sweep of each layer's code with the other layers drawn once."""
    g = torch.Generator().manual_seed(seed)
    paths = []
    for l, site in enumerate(model.latent_sites, start=1):
        d = (dims or {}).get(site, (0, 1))
        try:
            imgs = iv.traverse_layer(model, site, grid, span, dims=d, generator=g)
        except ValueError:
            continue  # a 1-d layer cannot be swept in 2-D
        paths.append(
            save_panels(
                os.path.join(folder, f"traversal_layer{l}.png"),
                [
                    (
                        f"rows: {site}[{d[0]}], cols: {site}[{d[1]}] over [-{span}, {span}]",
                        imgs.reshape(-1, *imgs.shape[2:]),
                        grid,
                    )
                ],
                f"{_name(config)}: traversal of layer {l}, other layers fixed",
                panel_width=5.0,
            )
        )
    return paths


def gibbs_figure(path, model, guide, config, x_test, num_chains=8, burn_in=20, thin=5, columns=8, seed=0) -> str:
    """Fig. 2: Gibbs chains that use only the bottom layer (Eq. 6) beside ancestral samples of the whole model.

    Chains start at test images spread over ``x_test`` (left column).  Each row of a Gibbs panel is one chain: the
    mean of ``p(x | z^{(t)})`` at steps ``burn_in + thin, burn_in + 2 thin, ...``.  For the VLAE and the autoregressive
    HVAE a second panel runs the chain on every layer (Eq. 16, Proposition 2).  The right panel holds mean images of
    ancestral samples ``z_L -> ... -> z_1 -> x`` (all layers from ``N(0, I)`` for the VLAE and VAE).
    """
    num_steps = burn_in + thin * columns
    starts = gb.chain_starts(model, x_test, num_chains, seed)
    steps = list(range(burn_in + thin, num_steps + 1, thin))
    sites = list(model.latent_sites)
    keeps = [(sites[0],)]
    if config.model_kind in ("vlae", "hvae-ar") and len(sites) > 1:
        keeps.append(tuple(sites))
    panels = [("chain starts x(0)\n(test images)", starts, 1)]
    for i, keep in enumerate(keeps):
        res = gb.gibbs_chain(model, guide, starts, num_steps, keep=keep, seed=seed + i)
        shown = res.means[[t - 1 for t in steps]].transpose(0, 1)  # (chains, columns, C, H, W)
        what = "bottom layer z1 only (Eq. 6)" if keep == (sites[0],) else "all layers (Eq. 16)"
        if len(sites) == 1:
            what = "z1 (Eq. 16)"
        title = f"Gibbs chain on {what}\nrow = chain, steps {steps[0]}..{steps[-1]} every {thin}"
        panels.append((title, shown.reshape(-1, *shown.shape[2:]), columns))
    ancestral = gb.ancestral_means(model, num_chains * columns, seed=seed)
    if iv._is_stacked(model):
        chain = " -> ".join(reversed(sites)) + " -> x"
    else:
        chain = f"{sites[0]}..{sites[-1]} ~ N(0, I) -> x" if len(sites) > 1 else f"{sites[0]} ~ N(0, I) -> x"
    panels.append((f"ancestral samples of the full model\n{chain}", ancestral, columns))
    return save_panels(
        path, panels, f"{_name(config)} on {config.dataset}: Gibbs chain vs ancestral sampling (mean images)"
    )


def write_figures(run_dir, model, guide, config, x_test, log=print) -> list:
    """Write every figure for a trained run into ``run_dir/figures``; returns the paths."""
    folder = os.path.join(run_dir, "figures")
    os.makedirs(folder, exist_ok=True)
    model.eval(), guide.eval()
    paths = [
        reconstructions(os.path.join(folder, "reconstructions.png"), model, guide, x_test[:32], config),
        prior_samples(os.path.join(folder, "prior_samples.png"), model, config),
    ]
    if len(model.latent_sites) > 1:
        paths += intervention_figures(folder, model, config)
    paths.append(gibbs_figure(os.path.join(folder, "gibbs_vs_ancestral.png"), model, guide, config, x_test))
    if config.model_kind in ("vlae", "vae"):
        shapes = iv.latent_shapes(model)
        dims = {s: iv.top_kl_dims(model, guide, x_test[:256], s) for s, shp in shapes.items() if shp[0] > 2}
        paths += traversal_figures(folder, model, config, dims=dims)
    return paths
