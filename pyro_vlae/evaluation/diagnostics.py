"""Numbers behind the figures, merged into a run's ``eval.json``: per-layer interventions and Gibbs-chain mixing.

* ``"layers"`` (:func:`layer_diagnostics`): for each layer, the share of pixel variance and the rate of class
  changes caused by resampling that layer alone (Section 3.2 / Fig. 3 for the HVAE, Fig. 5-7 for the VLAE), and the
  average KL of each of its dimensions.
* ``"gibbs"`` (:func:`gibbs_diagnostics`): several chains of Eq. 6 (bottom layer) and Eq. 16 (every layer) started at
  different test images, with ArviZ's rank-normalised split R-hat and effective sample sizes of per-step summary
  statistics; then many independent chains scored at one step against the other test images: with a classifier, their
  Fréchet distance beside that of as many ancestral samples (Fig. 2 in numbers), and a collapse check
  (:func:`~.collapse.chain_collapse`): a chain whose states lost the data's spread or class diversity, or whose
  Fréchet distance blew up, is flagged and never reported as converged, whatever its R-hat.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch

from ..experiments import interventions as iv
from ..experiments.gibbs import ancestral_means, chain_snapshots, chain_starts, gibbs_chain
from ..training.checkpoint import update_json
from .classifier import class_change_rate, extract_features, frechet_distance
from .collapse import chain_collapse, collapse_summary
from .collapse import class_probs as _class_probs

__all__ = [
    "chain_collapse",
    "chain_summary",
    "collapse_summary",
    "gibbs_diagnostics",
    "jsonable",
    "layer_diagnostics",
    "run_diagnostics",
    "update_eval_json",
    "verdict_split",
]


def _arviz():
    with warnings.catch_warnings():  # arviz announces an upcoming refactor with a FutureWarning on import
        warnings.simplefilter("ignore", FutureWarning)
        import arviz
    return arviz


def _num(v):
    """A JSON-safe float: ``None`` for NaN or infinities."""
    v = float(v)
    return v if math.isfinite(v) else None


def jsonable(obj):
    """``obj`` with tensors and numpy values turned into lists and floats, and non-finite floats into ``None``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj


def chain_summary(values) -> dict:
    """Mean, standard deviation, split R-hat and bulk/tail ESS of a statistic recorded as ``(chain, draw)``.

    R-hat and ESS are ``None`` when they are undefined: fewer than two chains or four draws, or a constant statistic.

    :param values: array-like of shape ``(num_chains, num_draws)``.
    """
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"values must be shaped (chain, draw), got {a.shape}")
    out = {"mean": _num(a.mean()), "sd": _num(a.std()), "rhat": None, "ess_bulk": None, "ess_tail": None}
    if a.shape[0] < 2 or a.shape[1] < 4 or not np.all(np.isfinite(a)) or np.ptp(a) == 0:
        return out
    az = _arviz()
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out["rhat"] = _num(az.rhat(a))
        out["ess_bulk"] = _num(az.ess(a, method="bulk"))
        out["ess_tail"] = _num(az.ess(a, method="tail"))
    return out


def layer_diagnostics(
    model, guide, config, x_test, classifier=None, seed: int = 0, num_groups: int = 32, num_samples: int = 16
) -> dict:
    """Per-layer intervention numbers.

    For each layer ``z_l``:

    * ``variance_share``: :func:`~pyro_vlae.experiments.variance_share`, the average within-group pixel variance when
      only ``z_l`` (HVAE: its noise ``eps_l``) is resampled, over the pixel variance of independent ancestral samples.
    * ``class_change_rate`` (with a classifier): in each group of ``num_samples`` images that share every other
      layer's noise, the fraction of images ``2..S`` whose predicted class differs from that of image 1, the group's
      first draw (both are draws of ``z_l``; no un-resampled base image is involved).  ``baseline_class_change_rate``
      is the same rate for pairs of independent ancestral samples (every layer resampled), the reference to compare to.
    * ``kl_per_dim``: the average KL of each dimension on (up to 256 of) ``x_test``
      (:func:`pyro_vlae.experiments.interventions.kl_per_dim`).

    Images are mean images of ``p(x|z)``.  The caller's random streams are untouched.

    :param model: a trained pyro_vlae model.
    :param guide: its guide.
    :param config: the run's ``RunConfig`` (only ``model_kind`` is read, and only for the record).
    :param x_test: test images ``(N, C, H, W)``.
    :param classifier: optional classifier (``pyro_vlae.evaluation.classifier.SmallCNN``) on images in ``[0, 1]``.
    :param seed: seed of every draw.
    :param num_groups: groups per layer.
    :param num_samples: draws of the resampled layer per group.
    """
    dev = iv._device(model)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), iv.eval_mode(model, guide):
        torch.manual_seed(seed)
        shares = iv.variance_share(model, num_groups, num_samples, seed=seed)
        x = x_test[:256].to(dev)
        layers = {s: {"variance_share": shares[s], "kl_per_dim": iv.kl_per_dim(model, guide, x, s)} for s in shares}
        out = {"model_kind": getattr(config, "model_kind", None), "layers": layers}
        if classifier is not None:
            g = torch.Generator().manual_seed(seed + 1)
            for s in layers:
                imgs = iv.intervene_layer(model, s, num_groups, num_samples, generator=g)
                ref = imgs[:, :1].expand(-1, num_samples - 1, *imgs.shape[2:]).reshape(-1, *imgs.shape[2:])
                layers[s]["class_change_rate"] = class_change_rate(classifier, ref, imgs[:, 1:].reshape_as(ref))
            pairs = ancestral_means(model, 2 * num_groups * (num_samples - 1), seed=seed + 2)
            out["baseline_class_change_rate"] = class_change_rate(classifier, *pairs.chunk(2))
    out["settings"] = {"num_groups": num_groups, "num_samples": num_samples, "seed": seed}
    return jsonable(out)


def _chain_block(result, burn_in: int, classifier, starts) -> dict:
    """R-hat, ESS and class-switch summaries of one batch of chains after ``burn_in`` steps."""
    means = result.means[burn_in:]  # (draws, chains, C, H, W)
    draws, chains = means.shape[:2]
    stats = {"mean_intensity": chain_summary(means.flatten(2).mean(-1).T.cpu())}
    for site, codes in result.codes.items():
        for i in range(codes.shape[-1]):
            stats[f"{site}[{i}]"] = chain_summary(codes[burn_in:, :, i].T.cpu())
    block = {"keep": list(result.keep), "stats": stats}
    flat = means.reshape(draws * chains, *means.shape[2:])
    if classifier is not None:
        probs = _class_probs(classifier, flat).reshape(draws, chains, -1)
        for k in range(probs.shape[-1]):
            stats[f"p(class {k})"] = chain_summary(probs[..., k].T)
        pred = probs.argmax(-1)  # (draws, chains)
        block["class_switch_rate"] = (pred[1:] != pred[:-1]).double().mean().item() if draws > 1 else None
        block["start_class_kept_rate"] = (pred == _class_probs(classifier, starts).argmax(-1)).double().mean().item()
    rhats = [v["rhat"] for v in stats.values() if v["rhat"] is not None]
    esses = [v["ess_bulk"] for v in stats.values() if v["ess_bulk"] is not None]
    block["max_rhat"] = max(rhats) if rhats else None
    block["min_ess_bulk"] = min(esses) if esses else None
    return block


def verdict_split(n: int, num_chains: int, seed: int) -> tuple:
    """Indices of ``min(num_chains, n // 2)`` chain starts and of the other images (the reference), at random
    (``torch.Generator().manual_seed(seed)``), so that no chain starts at a reference image."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    v = min(int(num_chains), n // 2)
    return perm[:v], perm[v:]


def _verdict_states(model, guide, starts, keep, num_steps: int, seed: int) -> torch.Tensor:
    """Mean images of ``p(x | z_K)`` at step ``num_steps`` of independent chains, one per start (on the CPU)."""
    return chain_snapshots(model, guide, starts, [num_steps], keep=keep, seed=seed)[num_steps]["means"].cpu()


def gibbs_diagnostics(
    model, guide, config, x_test, classifier=None, num_chains: int = 8, num_steps: int = 100, seed: int = 0,
    burn_in: int | None = None, verdict_chains: int = 256,
) -> dict:  # fmt: skip
    """R-hat and ESS of Gibbs chains (Eq. 6 on ``z1``; Eq. 16 on every layer when there are several), and a collapse
    verdict from independent chains.

    Mixing: ``num_chains`` chains start at test images spread over ``x_test`` (binarised first for a Bernoulli
    likelihood). After ``burn_in`` steps (default half), each step's state is summarised by the mean intensity of the
    mean image of ``p(x|z^{(t)})``, each coordinate of the kept codes, and with a classifier the predicted probability
    of every class. Each summary is a ``(chain, draw)`` array given to :func:`chain_summary`; ``max_rhat`` and
    ``min_ess_bulk`` are the worst over summaries. R-hat near 1 says the chains forgot their different starts; it
    does not say they reached the data distribution. With a classifier each chain block also holds the rate at which
    the predicted class changes from one step to the next (``class_switch_rate``) and the share of post-burn-in
    states still classified as their chain's start image (``start_class_kept_rate``).

    Verdict: ``verdict_chains`` independent chains (at most half of ``x_test``) start at random test images, and their
    mean images at step ``num_steps`` are compared with the other test images (the reference), as
    ``benchmarks/claims/gibbs_mnist.py`` scores chains at fixed steps. Each chain block's ``collapse`` is
    :func:`chain_collapse` of those states; with a classifier, the block ``frechet_distance`` holds their Fréchet
    distance to the reference beside that of as many ancestral mean images. Both sets are independent images of the
    same size, so the distance's bias is the same for both: a correct chain started from data stays at the data's law
    at every step, however slowly it mixes, and is not flagged; pooling autocorrelated draws of a few chains would
    make a slow chain look far from the data. The distinct-mode count of the collapse check compares the states with
    as many ancestral mean images, the same kind of image. ``collapse_detected`` says whether any chain collapsed.

    :param model: a trained pyro_vlae model.
    :param guide: its guide.
    :param config: the run's ``RunConfig`` (``model_kind`` is recorded).
    :param x_test: test images ``(N, C, H, W)``, ``N >= 4``.
    :param classifier: optional classifier on images in ``[0, 1]``.
    :param num_chains: chains per keep set for R-hat and ESS.
    :param num_steps: steps per chain.
    :param seed: seed of the chains, the split and the ancestral samples; the caller's random streams are untouched.
    :param burn_in: steps discarded before summarising (default ``num_steps // 2``); at least 4 draws must remain.
    :param verdict_chains: independent chains scored at step ``num_steps`` for the collapse verdict.
    """
    burn_in = num_steps // 2 if burn_in is None else int(burn_in)
    if num_steps - burn_in < 4 or burn_in < 0:
        raise ValueError(f"need at least 4 draws after burn-in, got num_steps={num_steps}, burn_in={burn_in}")
    if x_test.shape[0] < 4 or verdict_chains < 2:
        raise ValueError(
            f"need at least 4 test images and 2 verdict chains, got {x_test.shape[0]} and {verdict_chains}"
        )
    starts = chain_starts(model, x_test, num_chains, seed)
    v_idx, ref_idx = verdict_split(x_test.shape[0], verdict_chains, seed)
    v_starts, reference = chain_starts(model, x_test[v_idx], len(v_idx), seed), x_test[ref_idx]
    sites = list(model.latent_sites)
    keeps = {"z1": (sites[0],)}
    if len(sites) > 1:
        keeps["all"] = tuple(sites)
    out = {
        "model_kind": getattr(config, "model_kind", None),
        "num_chains": int(starts.shape[0]),
        "num_steps": int(num_steps),
        "burn_in": burn_in,
        "seed": seed,
        "verdict": {"num_chains": len(v_idx), "step": int(num_steps), "reference_images": len(ref_idx)},
        "chains": {},
    }
    states = {}
    for i, (name, keep) in enumerate(keeps.items()):
        result = gibbs_chain(model, guide, starts, num_steps, keep=keep, seed=seed + i, return_means=True)
        out["chains"][name] = _chain_block(result, burn_in, classifier, starts)
        states[name] = _verdict_states(model, guide, v_starts, keep, num_steps, seed + 100 + i)
    fd, anc = {}, ancestral_means(model, len(v_idx), seed=seed).cpu()
    if classifier is not None:
        ref = extract_features(classifier, reference)
        fd = {"reference_images": len(ref_idx), "num_images": len(v_idx), "step": int(num_steps)}
        for name, imgs in states.items():
            fd[f"gibbs_{name}"] = frechet_distance(extract_features(classifier, imgs), ref)
        fd["ancestral"] = frechet_distance(extract_features(classifier, anc), ref)
        out["frechet_distance"] = fd
    for name, imgs in states.items():
        out["chains"][name]["collapse"] = chain_collapse(
            imgs, reference, classifier, fd.get(f"gibbs_{name}"), fd.get("ancestral"), baseline=anc
        )
    out["collapse_detected"] = any(b["collapse"]["collapsed"] for b in out["chains"].values())
    return jsonable(out)


def update_eval_json(run_dir: str, key: str, value) -> dict:
    """Set ``key`` of ``run_dir/eval.json`` to ``value`` (made JSON-safe), keeping every other key; atomic write.

    An unreadable ``eval.json`` is replaced by a fresh one.  Returns the whole new content.
    """
    return update_json(os.path.join(run_dir, "eval.json"), {key: jsonable(value)})


def run_diagnostics(run_dir, model, guide, config, x_test, classifier=None, seed: int = 0, **gibbs_kwargs) -> dict:
    """Compute :func:`layer_diagnostics` and :func:`gibbs_diagnostics` and merge them into ``run_dir/eval.json``
    under ``"layers"`` and ``"gibbs"``.

    :param gibbs_kwargs: passed to :func:`gibbs_diagnostics` (``num_chains``, ``num_steps``, ``burn_in``).
    :returns: ``{"layers": ..., "gibbs": ...}``.
    """
    layers = layer_diagnostics(model, guide, config, x_test, classifier=classifier, seed=seed)
    gibbs = gibbs_diagnostics(model, guide, config, x_test, classifier=classifier, seed=seed, **gibbs_kwargs)
    update_eval_json(run_dir, "layers", layers)
    update_eval_json(run_dir, "gibbs", gibbs)
    return {"layers": layers, "gibbs": gibbs}
