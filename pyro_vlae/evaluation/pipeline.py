"""Measure a trained run and write ``eval.json`` and ``report.md``: :func:`evaluate_run`, the body of the
``python -m pyro_vlae.evaluate`` command (:mod:`pyro_vlae.evaluate`).

What is measured (see :mod:`pyro_vlae.evaluation.likelihood`): the test ELBO and the importance-sampled ``log p(x)``
(IWAE bound with ``K`` samples) in nats and bits/dim, the KL and active units of every layer, and for labelled
datasets a cached classifier's test accuracy, the Fréchet distance of its features between ancestral samples and test
images, and the linear-probe accuracy of every layer's posterior mean.  On datasets with ground-truth factors the
disentanglement scores of :mod:`pyro_vlae.evaluation.disentangle` are added.  The intervention and Gibbs-chain
diagnostics of :mod:`pyro_vlae.evaluation.diagnostics` run too.  Results are merged into ``eval.json`` under
``evaluation.<split>`` (other blocks are kept) and rendered into ``report.md``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from ..data import FACTOR_DATASETS, load_data
from ..training.checkpoint import read_json_dict, update_json
from ..training.runs import load_run, resolve_device
from . import likelihood as M
from .report import write_report

#: Posterior-mean draws for guides whose layers depend on sampled lower layers (see ``metrics.posterior_means``).
SEQUENTIAL_MEAN_SAMPLES = 16
CONTINUOUS = ("gaussian", "laplace", "gaussian-learned")


def _split_data(bundle, split: str, limit: int | None) -> tuple:
    """The first ``limit`` (all when ``None``) images and labels of ``split``, in the split's stored order."""
    tensors = bundle.tensors(split)
    if tensors is not None:
        x, y = tensors
        return (x, y) if limit is None else (x[:limit], y[:limit])
    dataset = bundle.test if split == "test" else bundle.train
    xs, ys, count = [], [], 0
    for x, y in DataLoader(dataset, batch_size=256, shuffle=False):
        xs.append(x), ys.append(y)
        count += x.shape[0]
        if limit is not None and count >= limit:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    return (x, y) if limit is None else (x[:limit], y[:limit])


def _batches(x: torch.Tensor, size: int):
    for i in range(0, x.shape[0], size):
        yield x[i : i + size]


def likelihood_block(model, guide, config, x, num_samples, batch_size, chunk_size, log) -> tuple:
    """ELBO, IWAE bound, reconstruction and per-layer KL averaged over ``x``; returns ``(block, per-layer KL)``."""
    parts, t0 = [], time.time()
    for xb in _batches(x, batch_size):
        parts.append(M.importance_log_likelihood(model, guide, xb, num_samples, chunk_size=chunk_size))
    log_px = torch.cat([p.log_px for p in parts])
    elbo = torch.cat([p.elbo for p in parts])
    recon = torch.cat([p.recon for p in parts])
    kls = {s: float(torch.cat([p.kl[s] for p in parts]).mean()) for s in parts[0].kl}
    dims = math.prod(x.shape[1:])
    n = x.shape[0]
    block = {
        "num_images": n,
        "num_samples": num_samples,
        "num_dims": dims,
        "likelihood": config.model.likelihood,
        "density": config.model.likelihood in CONTINUOUS,
        "elbo": float(elbo.mean()),
        "iwae": float(log_px.mean()),
        "iwae_stderr": float(log_px.std() / math.sqrt(n)) if n > 1 else 0.0,
        "iwae_minus_elbo": float((log_px - elbo).mean()),
        "recon": float(recon.mean()),
        "kl_total": sum(kls.values()),
        "elbo_bpd": M.bits_per_dim(float(elbo.mean()), dims),
        "iwae_bpd": M.bits_per_dim(float(log_px.mean()), dims),
        "seconds": time.time() - t0,
    }
    log(
        f"likelihood on {n} images, K={num_samples}: ELBO {block['elbo']:.3f} nats, log p(x) >= {block['iwae']:.3f} "
        f"+- {block['iwae_stderr']:.3f} nats ({block['iwae_bpd']:.4f} bits/dim), {block['seconds']:.1f}s"
    )
    return block, {s: {"kl": v, "kl_method": parts[0].kl_method[s]} for s, v in kls.items()}


def mean_draws(guide) -> int:
    """Draws used by :func:`moments_of`: 1 where every layer depends on ``x`` only (guides with ``posterior``)."""
    return 1 if hasattr(guide, "posterior") else SEQUENTIAL_MEAN_SAMPLES


def moments_of(model, guide, x, batch_size) -> dict:
    """Posterior mean, variance and Monte Carlo variance of the mean of every layer of ``x``
    (:func:`~.likelihood.posterior_moments`; one draw for VLAE/VAE guides, several for sequential ones)."""
    draws = mean_draws(guide)
    parts = [M.posterior_moments(guide, xb, draws, sites=model.latent_sites) for xb in _batches(x, batch_size)]
    return {s: {k: torch.cat([p[s][k] for p in parts]) for k in parts[0][s]} for s in model.latent_sites}


def codes_of(model, guide, x, batch_size) -> dict:
    """Posterior means of every layer of ``x`` (the ``mean`` of :func:`moments_of`)."""
    return {s: m["mean"] for s, m in moments_of(model, guide, x, batch_size).items()}


def latents_block(moments: dict, kls: dict, log) -> dict:
    """Per layer: KL (and how it was computed), size, active units (x explains over
    :data:`~.likelihood.ACTIVE_SHARE` of the dim's variance), the share each dim's variance x explains, Burda et al.'s
    count beside it (posterior-mean variance over 0.01) and the variance of each posterior-mean dim."""
    out = {}
    for site, m in moments.items():
        c = m["mean"]
        if c.shape[0] > 1:
            au = M.active_units(c, variance=m["variance"], mc_variance=m["mc_variance"])
        else:
            au = {"active": None, "dims": c.shape[1], "variance": [], "explained_share": []}
            au["active_mean_variance"] = None
        out[site] = {
            **kls[site], "dims": au["dims"], "active_units": au["active"], "au_variance": au["variance"],
            "active_units_mean_variance": au["active_mean_variance"], "explained_share": au["explained_share"],
            "active_share_threshold": M.ACTIVE_SHARE,
        }  # fmt: skip
    log(
        "layers: "
        + ", ".join(
            f"{s} KL {v['kl']:.3f}, {v['active_units']}/{v['dims']} active "
            f"({v['active_units_mean_variance']} by posterior-mean variance)"
            for s, v in out.items()
        )
    )
    return out


@torch.no_grad()
def ancestral_samples(model, n: int, batch_size: int) -> torch.Tensor:
    """Mean images of ``n`` ancestral draws from the prior (probabilities for a Bernoulli likelihood)."""
    with M.eval_mode(model):
        out = [model(batch_size=min(batch_size, n - i)).cpu() for i in range(0, n, batch_size)]
    return torch.cat(out).clamp(0.0, 1.0)


def classifier_blocks(model, bundle, x_eval, y_eval, codes, train_codes, y_train_probe, cache_dir, device, bs, log):
    """Classifier accuracy, Fréchet distances and per-layer linear probes, for datasets with class labels."""
    from .classifier import extract_features, frechet_distance, get_classifier

    x_train, y_train = bundle.tensors("train")
    x_test, y_test = bundle.tensors("test")
    clf, info = get_classifier(
        x_train, y_train, num_classes=bundle.num_classes, cache_dir=cache_dir, x_test=x_test, y_test=y_test,
        device=device, log=log,
    )  # fmt: skip
    classifier = {"test_accuracy": info["test_accuracy"], "cached": info["cached"], "path": info["path"]}
    n = x_eval.shape[0]
    feats_eval = extract_features(clf, x_eval)
    feats_samples = extract_features(clf, ancestral_samples(model, n, bs))
    quality = {
        "num_images": n,
        "fd_samples": frechet_distance(feats_samples, feats_eval),
        "fd_train_vs_eval": frechet_distance(extract_features(clf, x_train[:n]), feats_eval),
    }
    log(
        f"Fréchet distance of classifier features, samples/test "
        f"{quality['fd_samples']:.3f} (train/test images: {quality['fd_train_vs_eval']:.3f})"
    )
    probes = {}
    for site in list(codes) + ["all"]:
        tr = torch.cat(list(train_codes.values()), 1) if site == "all" else train_codes[site]
        te = torch.cat(list(codes.values()), 1) if site == "all" else codes[site]
        probes[site] = M.linear_probe(tr, y_train_probe, te, y_eval, bundle.num_classes)
    log("linear-probe test accuracy: " + ", ".join(f"{s} {p['test_accuracy']:.3f}" for s, p in probes.items()))
    return clf, classifier, quality, probes


def disentanglement_block(model, guide, bundle, max_items, batch_size, device, log, dci_estimator="gbt") -> dict:
    """MIG, DCI, SAP per layer on the posterior means of up to ``max_items`` test items with ground-truth factors,
    over the dims whose variance x explains (:func:`~.likelihood.explained_share`).

    DCI fits disentanglement_lib's gradient-boosted trees, one tree per factor value and boosting stage, on all codes
    and again on each layer: minutes on a CPU for the sprites factors.  ``dci_estimator="lda"`` takes the named
    variant of :func:`~.disentangle.evaluate_all` instead (seconds; not disentanglement_lib's definition).
    """
    from .disentangle import evaluate_all

    x, factors = _split_data(bundle, "test", max_items)
    moments = moments_of(model, guide, x.to(device), batch_size)
    groups, start = [], 0
    for site, m in moments.items():
        groups.append((site, slice(start, start + m["mean"].shape[1])))
        start += m["mean"].shape[1]
    flat = torch.cat([m["mean"] for m in moments.values()], 1).numpy()
    share = torch.cat([M.explained_share(m["mean"], m["variance"], m["mc_variance"]) for m in moments.values()])
    slow = " (DCI's trees take minutes)" if dci_estimator == "gbt" else f" (DCI: the {dci_estimator} variant)"
    log(f"disentanglement: fitting SAP's and DCI's classifiers on {x.shape[0]} items{slow}")
    res = evaluate_all(
        flat, factors.numpy(), groups=groups, factor_names=bundle.factor_names, dci_estimator=dci_estimator,
        explained_share=share.numpy(),
    )  # fmt: skip
    log(
        f"disentanglement on {x.shape[0]} items: "
        + ", ".join(f"{k} {v:.3f}" for k, v in res["overall"]["summary"].items())
    )
    return res


def diagnostics_if_available(run_dir, model, guide, config, x_eval, clf, log) -> dict | None:
    """Call :func:`.diagnostics.run_diagnostics` when that module exists; it merges its own eval.json blocks."""
    try:
        from .diagnostics import run_diagnostics
    except ImportError as e:
        log(f"diagnostics skipped: pyro_vlae.evaluation.diagnostics is not available ({e})")
        return None
    try:
        out = run_diagnostics(run_dir, model, guide, config, x_eval, classifier=clf)
        log("diagnostics (per-layer interventions, Gibbs chains) merged into eval.json")
        return out
    except Exception as e:  # the rest of the evaluation stands on its own: report the failure, keep going
        log(f"diagnostics failed ({type(e).__name__}: {e}); the report is written without them")
        return {"error": f"{type(e).__name__}: {e}"}


def merge_eval_json(run_dir: str, split: str, block: dict, log=print) -> dict:
    """Put ``block`` at ``evaluation.<split>`` of ``run_dir/eval.json``, keeping every other entry; atomic write."""
    path = os.path.join(run_dir, "eval.json")
    evaluation = read_json_dict(path, log).get("evaluation")
    evaluation = evaluation if isinstance(evaluation, dict) else {}
    evaluation[split] = block
    return update_json(path, {"evaluation": evaluation}, log)


def evaluate_run(
    run_dir: str, num_samples: int = 50, split: str = "test", max_images: int | None = 1000,
    device: str | torch.device = "auto", *, batch_size: int = 100, chunk_size: int | None = None,
    classifier_cache: str | None = None, probe_images: int = 5000, disentangle_images: int = 5000,
    classifier: bool = True, run_diagnostics: bool = True, dci_estimator: str = "gbt", seed: int = 0,
    log: Callable[[str], object] = print,
) -> dict:  # fmt: skip
    """Evaluate the run in ``run_dir``, merge the results into ``eval.json`` and write ``report.md``.

    :param run_dir: a run folder holding ``checkpoints/latest.pt``.
    :param num_samples: importance samples ``K`` per image for the IWAE bound (and the ELBO average).
    :param split: ``"test"`` or ``"train"``: images the likelihood, codes and probes are measured on.
    :param max_images: how many images of the split (the first ones, in stored order); ``None`` or 0 for all.
    :param device: ``auto``, ``cpu`` or ``cuda``.
    :param batch_size: images per forward pass (each pass holds ``chunk_size * batch_size`` rows).
    :param chunk_size: importance samples per pass; default keeps a pass near 1024 rows.
    :param classifier_cache: classifier cache folder (default ``<data_dir>/classifiers``).
    :param probe_images: training-split images whose codes train the linear probes.
    :param disentangle_images: test items for the disentanglement scores (datasets with ground-truth factors).
    :param dci_estimator: ``"gbt"`` (disentanglement_lib's gradient-boosted trees, minutes) or ``"lda"`` (a variant).
    :param classifier: measure the classifier-based numbers (sample quality, probes, class-change rates).  The
        classifier is trained on the first call for a dataset (minutes on MNIST on a CPU), then read from the cache.
    :param run_diagnostics: also run :mod:`.diagnostics` (interventions and Gibbs chains; the slowest part).
    :param seed: seed of the importance samples, ancestral samples and binarisation (the caller's RNG is untouched).
    :param log: callback receiving progress lines.
    :return: the ``evaluation.<split>`` block, plus ``diagnostics`` when they ran.
    :raises CheckpointError: no or a corrupt checkpoint.  :raises DatasetError: the run's dataset cannot be loaded.

    A four-step run of the tiny preset, measured without the classifier and the diagnostics:

    >>> import dataclasses, os, tempfile
    >>> import pyro_vlae as pv
    >>> preset = pv.get_preset("tiny")
    >>> config = pv.RunConfig("vlae", "synthetic", "tiny", preset.model, dataclasses.replace(preset.train, num_steps=4))
    >>> with tempfile.TemporaryDirectory() as run_dir:
    ...     _ = pv.fit(config, pv.load_data("synthetic", batch_size=16), run_dir, "cpu", progress=False)
    ...     results = pv.evaluate_run(run_dir, num_samples=5, max_images=64, device="cpu", classifier=False,
    ...                               run_diagnostics=False, log=lambda line: None)
    ...     os.path.exists(os.path.join(run_dir, "eval.json")), os.path.exists(os.path.join(run_dir, "report.md"))
    (True, True)
    >>> sorted(results), results["likelihood"]["num_samples"]  # IWAE and ELBO in nats and bits/dim, KLs per layer
    (['latents', 'likelihood', 'settings'], 5)
    """
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    device = resolve_device(device) if isinstance(device, str) else device
    t_start = time.time()
    model, guide, config, state = load_run(run_dir, device)
    size = config.model.image_shape[-1]
    sizes = {"sprites_size": size, "shapes3d_size": size, "celeba_size": size}
    bundle = load_data(config.dataset, config.data_dir, batch_size, seed=config.seed, **sizes)
    limit = max_images or None
    x_eval, y_eval = _split_data(bundle, split, limit)
    if x_eval.shape[0] < 2:
        raise ValueError(f"need at least 2 images to evaluate, got {x_eval.shape[0]}; raise --max-images")
    log(f"evaluating {run_dir}: {config.model_kind} on {config.dataset} ({split}, {x_eval.shape[0]} images), {device}")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        x_lik = x_eval
        if config.model.likelihood == "bernoulli":  # the model was trained on binarised draws: score one fixed draw
            x_lik = torch.bernoulli(x_eval, generator=torch.Generator().manual_seed(seed))
        lik, kls = likelihood_block(model, guide, config, x_lik.to(device), num_samples, batch_size, chunk_size, log)
        moments = moments_of(model, guide, x_eval.to(device), batch_size)
        codes = {s: m["mean"] for s, m in moments.items()}
        latents = latents_block(moments, kls, log)
        block = {"likelihood": lik, "latents": latents}
        clf = None
        if not classifier:
            log("classifier, sample quality and probes skipped (classifier=False)")
        elif bundle.num_classes and bundle.tensors("train") is not None:
            x_probe, y_probe = _split_data(bundle, "train", probe_images)
            train_codes = codes_of(model, guide, x_probe.to(device), batch_size)
            cache = classifier_cache or os.path.join(config.data_dir, "classifiers")
            clf, block["classifier"], block["sample_quality"], probes = classifier_blocks(
                model, bundle, x_eval, y_eval, codes, train_codes, y_probe, cache, device, batch_size, log
            )
            block["probes"] = probes
            for site in latents:
                latents[site]["probe_accuracy"] = probes[site]["test_accuracy"]
        else:
            why = "has no class labels" if not bundle.num_classes else "is not held in memory"
            log(f"classifier, sample quality and probes skipped: {config.dataset} {why}")
        if config.dataset in FACTOR_DATASETS:
            block["disentanglement"] = disentanglement_block(
                model, guide, bundle, disentangle_images, batch_size, device, log, dci_estimator
            )
        diagnostics, diag_status = None, "skipped"
        if run_diagnostics:
            diagnostics = diagnostics_if_available(run_dir, model, guide, config, x_eval.to(device), clf, log)
            diag_status = "unavailable" if diagnostics is None else "failed" if "error" in diagnostics else "ran"
        else:
            log("diagnostics skipped (run_diagnostics=False); an earlier layers/gibbs block in eval.json is kept")
    block["settings"] = {
        "split": split, "num_samples": num_samples, "max_images": limit, "batch_size": batch_size, "seed": seed,
        "checkpoint_step": int(state["step"]), "device": str(device), "diagnostics": diag_status,
        "posterior_mean_draws": mean_draws(guide),
        "seconds": time.time() - t_start,
    }  # fmt: skip
    if diagnostics is not None and "error" in diagnostics:
        block["diagnostics_error"] = diagnostics["error"]
    data = merge_eval_json(run_dir, split, block, log)
    path = write_report(run_dir, data, config, split=split)
    log(f"eval.json and {path} written ({time.time() - t_start:.1f}s)")
    return {**block, "diagnostics": diagnostics} if diagnostics is not None else block
