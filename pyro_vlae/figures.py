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


#: Chain steps shown by :func:`gibbs_figure` (the issue's t = 1, 10, 100, 1000).
GIBBS_FIGURE_STEPS = (1, 10, 100, 1000)


def _binary(model) -> bool:
    return getattr(getattr(model, "likelihood", None), "kind", None) == "bernoulli"


def _fd(classifier, images, ref_feats):
    from .evaluation.classifier import extract_features, frechet_distance

    return frechet_distance(extract_features(classifier, images), ref_feats)


def gibbs_figure(
    path, model, guide, config, x_test, num_chains=16, steps=GIBBS_FIGURE_STEPS, seed=0, classifier=None,
    reference=None, num_scored=64,
) -> str:  # fmt: skip
    """Fig. 2: the bottom-layer Gibbs chain (Eq. 6) at steps ``t`` beside ancestral samples of the whole model.

    Chains start at test images spread over ``x_test`` (first column).  Each later column shows the same chains at one
    step ``t``, chain ``i`` always in the same cell: the state ``x^{(t)}`` itself for a Bernoulli likelihood (binary
    images, the chain of Eq. 6), else the mean of ``p(x | z^{(t-1)})``.  The last column holds ancestral samples of
    the same kind.  For the VLAE and the autoregressive HVAE a second row runs the chain on every layer (Eq. 16).

    With a ``classifier``, every title gives the Fréchet distance of ``num_scored`` chains' (or ancestral samples')
    images to ``reference`` (default ``x_test``; binarised with a seeded draw for a Bernoulli likelihood).
    """
    import matplotlib.pyplot as plt

    from .plotting import image_grid

    binary = _binary(model)
    steps = sorted({int(t) for t in steps})
    n = max(num_chains, num_scored if classifier is not None else 0)
    starts = gb.chain_starts(model, x_test, n, seed)
    sites = list(model.latent_sites)
    keeps = [(sites[0],)]
    if config.model_kind in ("vlae", "hvae-ar") and len(sites) > 1:
        keeps.append(tuple(sites))
    ref_feats = None
    if classifier is not None:
        from .evaluation.classifier import extract_features

        ref = x_test if reference is None else reference
        if binary:
            ref = torch.bernoulli(ref, generator=torch.Generator(device=ref.device).manual_seed(seed + 7))
        ref_feats = extract_features(classifier, ref)
    if binary:
        ancestral = gb.ancestral_draws(model, n, seed=seed)
    else:
        ancestral = gb.ancestral_means(model, n, seed=seed)
    kind = "states x(t)" if binary else "mean images of p(x | z(t-1))"
    cols = len(steps) + 2
    nrow = max(1, int(round(num_chains**0.5)))
    fig, axes = plt.subplots(len(keeps), cols, figsize=(2.3 * cols, 2.6 * len(keeps) + 0.5), squeeze=False)
    for r, keep in enumerate(keeps):
        snaps = gb.chain_snapshots(model, guide, starts, steps, keep=keep, seed=seed + r)
        what = "z1 (Eq. 6)" if keep == (sites[0],) else "all layers (Eq. 16)"
        cells = [(f"starts x(0)\nchain on {what}", starts)]
        for t in steps:
            imgs = snaps[t]["states" if binary else "means"]
            title = f"t = {t}" + (f"\nFD {_fd(classifier, imgs, ref_feats):.1f}" if ref_feats is not None else "")
            cells.append((title, imgs))
        if r == 0:
            fd = f"\nFD {_fd(classifier, ancestral, ref_feats):.1f}" if ref_feats is not None else ""
            cells.append(("ancestral samples" + fd, ancestral))
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(cells):
                title, imgs = cells[c]
                ax.imshow(image_grid(imgs[:num_chains].float(), nrow), cmap="gray", vmin=0, vmax=1)
                ax.set_title(title, fontsize=9)
    scored = (
        f"; FD: Fréchet distance of {n} images to {ref_feats.shape[0]} test images" if ref_feats is not None else ""
    )
    fig.suptitle(
        f"{_name(config)} on {config.dataset}: Gibbs chain ({kind}) vs ancestral sampling{scored}", fontsize=10
    )
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> str:
    import io

    import matplotlib.pyplot as plt

    from .training.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def scored_gibbs_figure(run_dir, model, guide, config, bundle, device, max_reference=1000):
    """Write ``figures/gibbs_vs_ancestral.png`` with Fréchet distances in its titles, using the digit classifier the
    evaluation uses (cached under ``<data_dir>/classifiers``; trained there first if absent, and then loaded from the
    cache by the evaluation).  For datasets without class labels in memory the figure has no distances."""
    from .evaluation.classifier import get_classifier

    path = os.path.join(run_dir, "figures", "gibbs_vs_ancestral.png")
    train, test = bundle.tensors("train"), bundle.tensors("test")
    if not bundle.num_classes or train is None or test is None:
        x = (
            test[0][:64]
            if test is not None
            else torch.stack([bundle.test[i][0] for i in range(min(64, len(bundle.test)))])
        )
        return gibbs_figure(path, model, guide, config, x.to(device))
    cache = os.path.join(config.data_dir, "classifiers")
    clf, _ = get_classifier(*train, num_classes=bundle.num_classes, cache_dir=cache, device=device, log=print)
    x_ref = test[0][:max_reference].to(device)
    return gibbs_figure(path, model, guide, config, x_ref[:64], classifier=clf, reference=x_ref)


def write_figures(run_dir, model, guide, config, x_test, log=print, gibbs=True) -> list:
    """Write every figure for a trained run into ``run_dir/figures``; returns the paths.

    :param gibbs: also the Gibbs-chain figure (1000 steps); ``False`` when :func:`scored_gibbs_figure` will write it.
    """
    folder = os.path.join(run_dir, "figures")
    os.makedirs(folder, exist_ok=True)
    model.eval(), guide.eval()
    paths = [
        reconstructions(os.path.join(folder, "reconstructions.png"), model, guide, x_test[:32], config),
        prior_samples(os.path.join(folder, "prior_samples.png"), model, config),
    ]
    if len(model.latent_sites) > 1:
        paths += intervention_figures(folder, model, config)
    if gibbs:
        paths.append(gibbs_figure(os.path.join(folder, "gibbs_vs_ancestral.png"), model, guide, config, x_test))
    if config.model_kind in ("vlae", "vae"):
        shapes = iv.latent_shapes(model)
        dims = {s: iv.top_kl_dims(model, guide, x_test[:256], s) for s, shp in shapes.items() if shp[0] > 2}
        paths += traversal_figures(folder, model, config, dims=dims)
    return paths
