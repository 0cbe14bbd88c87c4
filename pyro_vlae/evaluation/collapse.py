"""Whether a Gibbs chain's states collapsed: :func:`chain_collapse` and its one-line summary for a run's log.

A chain that collapsed onto one image, or onto one or two classes, can still have R-hat near 1 (chains that agree on
a degenerate state mix perfectly), so the states are compared with data images directly. The spread check looks along
the data's principal directions rather than at single pixels: for binary states (a Bernoulli chain feeds back 0/1
draws) each pixel's variance is ``m (1 - m)`` whatever the images are, so chains stuck on one blurry image (binary
draws from one mean ``m``) have about the data's pixel variance; but their pixels vary independently, so along the
data's principal directions, where images differ, their variance is a small fraction of the data's. Chains stuck on
a handful of images keep most of the data's spread, so the states' distinct modes are counted too
(:func:`distinct_modes`), against as many data images.
"""

from __future__ import annotations

import math

import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

#: Collapse thresholds of :func:`chain_collapse`: the states have under a quarter of the data's variance along its top
#: principal directions, under half of the entropy of its predicted classes, or a Fréchet distance over three times
#: the baseline's (ancestral samples, as many and as independent as the states).
COLLAPSE_SPREAD_RATIO = 0.25
COLLAPSE_ENTROPY_RATIO = 0.5
COLLAPSE_FD_RATIO = 3.0
#: The states collapsed onto few modes when they fall into under this share of the distinct modes of as many data
#: images (:func:`distinct_modes`); two images are one mode when they are within the data's own
#: ``DUPLICATE_QUANTILE`` quantile of nearest-neighbour distances; fewer than ``MIN_MODE_IMAGES`` are not judged.
COLLAPSE_MODES_RATIO = 0.5
DUPLICATE_QUANTILE = 0.05
MIN_MODE_IMAGES = 20
#: Principal directions of the data used by :func:`pc_variance`, and the data rows used to find them.
NUM_DIRECTIONS = 10
MAX_REFERENCE_ROWS = 4000


def principal_directions(reference: torch.Tensor, k: int = NUM_DIRECTIONS) -> tuple:
    """The data's mean ``(P,)``, top ``k`` principal directions ``(P, k)`` (orthonormal columns) and the data's
    variance along each ``(k,)``, from at most :data:`MAX_REFERENCE_ROWS` images ``(M, ...)`` (SVD, float64).
    Directions along which the data do not vary (below ``1e-12`` of the largest variance) are left out."""
    x = reference.detach().flatten(1)[:MAX_REFERENCE_ROWS].double().cpu()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    var = s**2 / x.shape[0]
    k = min(k, int((var > 1e-12 * var.max().clamp_min(1e-300)).sum()))
    return mean, vh[:k].T, var[:k]


def pc_variance(images: torch.Tensor, directions: torch.Tensor) -> float:
    """Total variance of ``images`` ``(N, ...)`` along the columns of ``directions`` ``(P, k)``."""
    proj = images.detach().flatten(1).double().cpu() @ directions
    return proj.var(0, unbiased=False).sum().item()


def _pairwise(images: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(n, n)`` between flattened images, float64, exact (0 for identical rows), diagonal inf."""
    x = images.detach().flatten(1).double().cpu()
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    return d.fill_diagonal_(float("inf"))


def _modes(d: torch.Tensor, radius: float) -> tuple:
    """Connected components of the graph joining images within ``radius`` of each other, and the share of images
    with another image that close."""
    near = (d <= radius).numpy()
    count, _ = connected_components(csr_matrix(near), directed=False)
    return int(count), float(near.any(axis=1).mean())


def distinct_modes(images: torch.Tensor, reference: torch.Tensor) -> dict:
    """How many distinct modes the states ``images`` fall into, against as many ``reference`` images.

    ``m = min(N, M)`` images of each set are compared (the first ones: independent chains, independent samples or a
    random split of the data). Two images are duplicates when their distance is at most the ``radius``, the
    reference's own :data:`DUPLICATE_QUANTILE` quantile of nearest-neighbour distances among its ``m`` images, and a
    mode is a connected group of duplicates. The reference's modes are counted the same way, so that a reference
    which repeats images, or crowds in places, sets its own rate; a chain stuck on ``k`` images (up to a jitter within
    the radius) has ``k``. The reference must be the same kind of image as the states: mean images of a model lie
    closer together than data images (on a shapes3d VLAE, 256 ancestral mean images formed 36 modes at the test
    images' radius, and 242 at that of other ancestral mean images).

    :return: ``{"mode_images": m, "duplicate_radius", "distinct_modes", "reference_distinct_modes", "modes_ratio",
        "duplicate_rate", "reference_duplicate_rate"}`` (the rates: shares of images with a duplicate); all but
        ``mode_images`` are ``None`` when ``m`` is below :data:`MIN_MODE_IMAGES`.
    """
    m = min(images.shape[0], reference.shape[0])
    out = {"mode_images": m, "duplicate_radius": None, "distinct_modes": None, "reference_distinct_modes": None}
    out.update(modes_ratio=None, duplicate_rate=None, reference_duplicate_rate=None)
    if m < MIN_MODE_IMAGES:
        return out
    d_ref = _pairwise(reference[:m])
    radius = float(torch.quantile(d_ref.min(1).values, DUPLICATE_QUANTILE))
    out["duplicate_radius"] = radius
    out["reference_distinct_modes"], out["reference_duplicate_rate"] = _modes(d_ref, radius)
    out["distinct_modes"], out["duplicate_rate"] = _modes(_pairwise(images[:m]), radius)
    out["modes_ratio"] = out["distinct_modes"] / out["reference_distinct_modes"]
    return out


def class_entropy(pred: torch.Tensor, num_classes: int) -> float:
    """Entropy (nats) of the frequencies of the predicted classes ``pred`` (``(N,)`` integers)."""
    p = torch.bincount(pred.flatten().long().cpu(), minlength=num_classes).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum()) + 0.0  # + 0.0: no negative zero for a single class


@torch.no_grad()
def class_probs(classifier, x: torch.Tensor) -> torch.Tensor:
    """Softmax of the classifier's logits, ``(N, K)`` on the CPU, in eval mode (the mode is restored)."""
    dev = next(classifier.parameters()).device
    was = classifier.training
    classifier.eval()
    try:
        return torch.cat([torch.softmax(classifier(b.to(dev)), -1).cpu() for b in x.split(500)])
    finally:
        classifier.train(was)


def chain_collapse(images, reference, classifier=None, fd=None, fd_baseline=None, baseline=None) -> dict:
    """Whether a chain's states ``images`` collapsed, judged against ``reference`` data images.

    Three measured signs, each a ratio to the data's (or the baseline's) value:

    * ``spread_ratio``: the states' variance along the data's top :data:`NUM_DIRECTIONS` principal directions over the
      data's variance along them; a chain stuck on one image has none, and one stuck on one mean image that feeds back
      binary draws of it has only the independent pixel noise, a small fraction (pixel variance alone cannot tell:
      for 0/1 images it is ``m (1 - m)`` for any images of mean ``m``);
    * ``class_entropy_ratio`` (with a classifier): entropy of the states' predicted classes over that of the
      reference's; a chain that fell into one or two digits has little;
    * ``fd_ratio`` (with ``fd`` and ``fd_baseline``): the chain's Fréchet distance over the baseline's, which blows up
      when the states leave the data. The baseline must be as many independent images as the states (e.g. ancestral
      samples against independent chains scored at one step): the distance's bias depends on both.

    * ``modes_ratio``: the number of distinct modes among the states over that among as many ``baseline`` images
      (independent images of the same kind as the states, e.g. ancestral mean images), or without a baseline as many
      data images (:func:`distinct_modes`, whose keys are added, with ``modes_reference``: ``"baseline"`` or
      ``"data"``); a chain stuck on a handful of images keeps most of the data's spread and, without a classifier,
      passes every other check.

    ``collapsed`` is true when any ratio is past its threshold (:data:`COLLAPSE_SPREAD_RATIO`,
    :data:`COLLAPSE_ENTROPY_RATIO`, :data:`COLLAPSE_FD_RATIO`, :data:`COLLAPSE_MODES_RATIO`; the first two count only
    where the data have a variance above 1e-6 along those directions and a class entropy above 0.1 nats); ``reasons``
    says which, in words. A collapsed chain is not a sample of the data distribution, even when its R-hat is near 1.

    :param images: chain states ``(N, C, H, W)`` (the same kind of image as ``reference``: binary states against
        binary data, mean images against data images).
    :param reference: data images ``(M, C, H, W)``.
    :param classifier: optional classifier on images in ``[0, 1]``.
    :param fd: optional Fréchet distance of the states to the data.
    :param fd_baseline: the baseline's Fréchet distance to the same data.
    :param baseline: optional independent images of the same kind as the states ``(B, C, H, W)`` (ancestral mean
        images for mean-image states), the reference of the distinct-mode count.
    """
    _, directions, data_var = principal_directions(reference)
    out = {"spread": pc_variance(images, directions), "data_spread": float(data_var.sum()), "directions": len(data_var)}
    out["spread_ratio"] = out["spread"] / max(out["data_spread"], 1e-12)
    reasons = []
    if out["data_spread"] > 1e-6 and out["spread_ratio"] < COLLAPSE_SPREAD_RATIO:
        reasons.append(f"variance along the data's principal directions {out['spread_ratio']:.2f} of the data's")
    out.update(distinct_modes(images, reference if baseline is None else baseline))
    out["modes_reference"] = "data" if baseline is None else "baseline"
    if out["modes_ratio"] is not None and out["modes_ratio"] < COLLAPSE_MODES_RATIO:
        what = "data images" if baseline is None else "independent samples"
        reasons.append(
            f"distinct modes {out['distinct_modes']} among {out['mode_images']} states against "
            f"{out['reference_distinct_modes']} among as many {what}"
        )
    if classifier is not None:
        probs_chain, probs_data = class_probs(classifier, images), class_probs(classifier, reference)
        k = probs_chain.shape[-1]
        out["class_entropy"] = class_entropy(probs_chain.argmax(-1), k)
        out["data_class_entropy"] = class_entropy(probs_data.argmax(-1), k)
        out["class_entropy_ratio"] = out["class_entropy"] / max(out["data_class_entropy"], 1e-12)
        if out["data_class_entropy"] > 0.1 and out["class_entropy_ratio"] < COLLAPSE_ENTROPY_RATIO:
            reasons.append(f"class entropy {out['class_entropy_ratio']:.2f} of the data's")
    if fd is not None and fd_baseline is not None and math.isfinite(fd) and fd_baseline > 0:
        out["fd_ratio"] = float(fd) / float(fd_baseline)
        if out["fd_ratio"] > COLLAPSE_FD_RATIO:
            reasons.append(f"Fréchet distance {out['fd_ratio']:.1f}x the ancestral samples'")
    out["collapsed"] = bool(reasons)
    out["reasons"] = reasons
    out["thresholds"] = {
        "spread_ratio": COLLAPSE_SPREAD_RATIO,
        "class_entropy_ratio": COLLAPSE_ENTROPY_RATIO,
        "fd_ratio": COLLAPSE_FD_RATIO,
        "modes_ratio": COLLAPSE_MODES_RATIO,
    }
    return out


def collapse_summary(gibbs) -> str | None:
    """One sentence on the Gibbs chains' collapse check from a ``gibbs`` block of ``eval.json``, or ``None``."""
    chains = gibbs.get("chains") if isinstance(gibbs, dict) else None
    if not isinstance(chains, dict):
        return None
    checked = {
        n: b["collapse"] for n, b in chains.items() if isinstance(b, dict) and isinstance(b.get("collapse"), dict)
    }
    if not checked:
        return None
    checked = dict(sorted(checked.items(), key=lambda kv: (kv[0] != "z1", kv[0])))  # the bottom-layer chain first
    bad = {n: c for n, c in checked.items() if c.get("collapsed")}
    if not bad:
        return (
            "Gibbs chains: no collapse detected (keeping "
            + ", ".join(checked)
            + "); compare their Fréchet distance with the ancestral samples' before calling them converged."
        )
    parts = [f"keeping {n}: " + "; ".join(c.get("reasons") or ["collapsed"]) for n, c in bad.items()]
    return "Gibbs chain COLLAPSED, not converged (" + "; ".join(parts) + ")."


#: The collapse block's ratios shown in the report's Gibbs table (``pixel_variance_ratio``: what older runs wrote).
COLLAPSE_COLUMNS = ("spread_ratio", "pixel_variance_ratio", "modes_ratio", "class_entropy_ratio", "fd_ratio")


def collapse_lines(collapse: dict) -> list:
    """The report's collapse verdict in words (Markdown lines), first, so that a collapsed chain is never read as
    converged; ``collapse`` maps each chain's name to its :func:`chain_collapse` block."""
    bad = {n: c for n, c in sorted(collapse.items(), key=lambda kv: (kv[0] != "z1", kv[0])) if c.get("collapsed")}
    if not bad:
        return [f"No collapse detected in the chains keeping {', '.join(collapse)}.", ""] if collapse else []
    out = []
    for name, c in bad.items():
        why = "; ".join(c.get("reasons") or ["collapse flagged"])
        out.append(
            f"**The Gibbs chain keeping {name} collapsed ({why}): it is not converged, and its states are not "
            "samples of the data distribution.**"
        )
        out.append("")
    return out


def collapse_note(collapse: dict) -> str:
    """The sentence under the report's Gibbs table that says how the collapse ratios are measured and judged."""
    if not collapse:
        return "No collapse check was recorded for these chains."
    t = next((c["thresholds"] for c in collapse.values() if isinstance(c.get("thresholds"), dict)), None)
    note = "Ratios, from independent chains at their last step: spread (variance along the test images' principal "
    note += "directions)"
    if t and "modes_ratio" in t:
        ref = next((c.get("modes_reference") for c in collapse.values()), None)
        ref = "test images" if ref == "data" else "ancestral samples"
        note += f", distinct modes (states nearer each other than 95 % of as many {ref} are to their nearest one count"
        note += f" as one) over the {ref}'"
    note += " and class entropy over the test images', Fréchet distance over as many ancestral samples'"
    if t:
        spread = t.get("spread_ratio", t.get("pixel_variance_ratio"))
        modes = f", modes below {t['modes_ratio']:g}" if "modes_ratio" in t else ""
        note += (
            f"; a chain is flagged as collapsed with spread below {spread:g}{modes}, class entropy below "
            f"{t.get('class_entropy_ratio'):g} or Fréchet distance above {t.get('fd_ratio'):g}."
        )
    else:
        note += "."
    if any(c.get("collapsed") for c in collapse.values()):
        note += " Here a chain collapsed, so these R-hat and ESS values are no evidence of convergence to the data."
    return note
