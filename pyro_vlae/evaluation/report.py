"""``report.md``: a run's evaluation as Markdown, rendered from ``eval.json`` and the PNGs in ``figures/``.

:func:`render_report` is a pure function of the ``eval.json`` contents, the run's configuration and the figure
names, so a report can be rebuilt at any time from a run folder; :func:`write_report` writes it atomically.
Blocks that are absent (no classifier on an unlabelled dataset, no diagnostics, no disentanglement outside sprites)
are left out or marked as not measured.
"""

from __future__ import annotations

import math
import os
import re

from ..training.checkpoint import atomic_write_text
from .assignment import RULE
from .collapse import COLLAPSE_COLUMNS, collapse_lines, collapse_note

MODEL_NAMES = {"vlae": "VLAE", "hvae": "Markov HVAE", "hvae-ar": "autoregressive HVAE", "vae": "VAE"}
_LIKELIHOOD_NAMES = {
    "gaussian": "Gaussian",
    "laplace": "Laplace",
    "gaussian-learned": "Gaussian (learned scale)",
    "bernoulli": "Bernoulli",
}
_DIAG_FIRST = ("variance_share", "class_change_rate")
_GIBBS_FIRST = ("max_rhat", "min_ess_bulk")
_LABELS = {"max_rhat": "max R-hat", "min_ess_bulk": "min bulk ESS"}
_FIGURE_ORDER = ("reconstructions", "prior_samples", "interventions", "intervention_layer", "traversal_layer")


def fmt(v) -> str:
    """Format a number for a table: ``-`` for missing, 4 significant-ish digits, scientific for tiny values."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if not isinstance(v, float):
        return str(v)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.1f}"
    if a >= 100:
        return f"{v:.2f}"
    if a >= 1e-3:
        return f"{v:.4f}" if a < 1 else f"{v:.3f}"
    return f"{v:.2e}"


def _table(header, rows) -> list:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def _label(key: str) -> str:
    return _LABELS.get(key, str(key).replace("_", " "))


def _flatten(obj, prefix: str = "") -> dict:
    """Scalars of a nested dict as ``{"a.b": value}``; short numeric lists are kept as lists, other values dropped."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, (bool, int, float, str)):
        return {prefix: obj}
    if isinstance(obj, list) and 0 < len(obj) <= 8 and all(isinstance(v, (int, float)) for v in obj):
        return {prefix: obj}
    return {}


def _cell(v) -> str:
    return ", ".join(fmt(x) for x in v) if isinstance(v, list) else fmt(v)


def per_layer(block, sites) -> dict:
    """``{site: {metric: scalar}}`` from a diagnostics ``layers`` block: ``{"layers": {"z1": {...}}, ...}``, or keyed
    by site directly, or by metric (``{"variance_share": {"z1": ...}}`` or ``{"variance_share": [per layer]}``).
    Non-scalar entries (e.g. per-dimension lists) are left out."""
    out = {s: {} for s in sites}
    if not isinstance(block, dict):
        return out
    if isinstance(block.get("layers"), dict):
        block = block["layers"]
    for key, value in block.items():
        if key in out and isinstance(value, dict):
            out[key].update({k: v for k, v in _flatten(value).items() if _is_number(v)})
        elif isinstance(value, dict) and any(s in value for s in sites):
            for s in sites:
                if _is_number(value.get(s)):
                    out[s][key] = value[s]
        elif isinstance(value, list) and len(value) == len(sites) and all(_is_number(v) for v in value):
            for s, v in zip(sites, value):
                out[s][key] = v
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def figure_caption(name: str) -> str:
    """A caption for a PNG in ``figures/`` from its file name."""
    stem = os.path.splitext(name)[0]
    m = re.fullmatch(r"(\w+?)_?layer(\d+)", stem)
    if stem == "reconstructions":
        return "Test images (left) and their reconstructions from the posterior means (right)."
    if stem == "prior_samples":
        return "Mean images of ancestral samples from the prior."
    if stem == "interventions":
        return "Resampling one layer at a time, all layers side by side; each row keeps the other layers fixed."
    if m and m.group(1) == "intervention":
        return f"Resampling layer {m.group(2)} alone (z{m.group(2)}, or its noise for a stacked HVAE), others fixed."
    if m and m.group(1) == "traversal":
        return f"2-D traversal of layer {m.group(2)}'s code over [-2, 2], the other layers fixed."
    return stem.replace("_", " ").capitalize() + "."


def _figure_key(name: str):
    stem = os.path.splitext(name)[0]
    rank = next((i for i, p in enumerate(_FIGURE_ORDER) if stem.startswith(p)), len(_FIGURE_ORDER))
    return rank, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", stem)]


def list_figures(run_dir: str) -> list:
    """Names of the PNG files in ``run_dir/figures``, in reading order."""
    folder = os.path.join(run_dir, "figures")
    if not os.path.isdir(folder):
        return []
    return sorted((f for f in os.listdir(folder) if f.lower().endswith(".png")), key=_figure_key)


def _likelihood_section(lik) -> list:
    k = lik["num_samples"]
    pm = f" ± {fmt(lik['iwae_stderr'])}" if lik.get("iwae_stderr") else ""
    lines = ["## Likelihood", ""]
    lines += _table(
        ["quantity", "nats per image", "bits/dim"],
        [
            ["ELBO", lik["elbo"], lik["elbo_bpd"]],
            [f"log p(x), IWAE bound (K = {k})", fmt(lik["iwae"]) + pm, lik["iwae_bpd"]],
            ["IWAE bound − ELBO", lik["iwae_minus_elbo"], None],
            ["reconstruction E_q[log p(x|z)]", lik["recon"], None],
            ["total KL", lik["kl_total"], None],
        ],
    )
    lines.append(
        f"{lik['num_images']} images of {lik['num_dims']} dimensions; bits/dim = −log p(x) / (D ln 2). The ELBO is the "
        f"average of log w over the same K = {k} draws, so the IWAE bound is never below it; a wide gap means the "
        "guide is a poor importance proposal and the bound still rises with K (evaluate again with a larger "
        "`--num-samples`)."
    )
    if lik.get("density"):
        lines.append(
            f"The {_LIKELIHOOD_NAMES.get(lik['likelihood'], lik['likelihood'])} likelihood is continuous: log p(x) is "
            "a log *density*, so bits/dim may be "
            "negative and is not comparable with discrete (dequantised) bits/dim figures."
        )
    elif lik.get("likelihood") == "bernoulli":
        lines.append("Bernoulli likelihood: the images are scored on one fixed stochastic binarisation.")
    return lines + [""]


def _layers_section(ev, diag_block) -> list:
    latents = ev.get("latents", {})
    sites = list(latents)
    diag = per_layer(diag_block, sites)
    extra = [k for k in _DIAG_FIRST if any(k in diag[s] for s in sites)]
    for s in sites:
        extra += [k for k in diag[s] if k not in extra]
    probes = ev.get("probes", {})
    share = any("explained_share" in latents[s] for s in sites)  # older eval.json: Burda et al.'s count only
    header = ["layer", "dims", "KL (nats)", "active units"] + (["mean var > 0.01"] if share else [])
    header += ["probe accuracy"] if probes else []
    rows = []
    for s in sites:
        v = latents[s]
        kl = fmt(v.get("kl")) + (" (MC)" if v.get("kl_method") == "monte-carlo" else "")
        probe = [v.get("probe_accuracy")] if probes else []
        old = [f"{v.get('active_units_mean_variance')}/{v.get('dims')}"] if share else []
        rows.append([s, v.get("dims"), kl, f"{v.get('active_units')}/{v.get('dims')}"] + old + probe)
        rows[-1] += [diag[s].get(k) for k in extra]
    if "all" in probes:
        rows.append(["all layers", None, None, None] + [None] * share + [probes["all"]["test_accuracy"]])
        rows[-1] += [None] * len(extra)
    header += [_label(k) for k in extra]
    lines = ["## Layers", ""] + _table(header, rows)
    notes = [
        "KL is E_q[log q(z_l|·) − log p(z_l|·)] averaged over the images: in closed form given the guide's parents "
        "where the prior is N(0, I), else Monte Carlo (MC; for a layer whose prior depends on the layer above this "
        "term can be slightly negative). "
        + (
            "Active units: dims for which x explains over 1 % of the code's variance over the aggregate posterior, "
            "Var_x(E[z|x]) / Var(z) > 0.01 (a scale-free criterion; the Monte Carlo noise of estimated means is "
            "discounted); beside it, Burda et al.'s (2016) count, posterior-mean variance > 0.01, which suits "
            "unit-scale codes only."
            if share
            else "Active units: dims whose posterior mean varies across images with variance > 0.01 (Burda et al. "
            "2016)."
        )
    ]
    draws = ev.get("settings", {}).get("posterior_mean_draws", 1)
    if draws > 1:
        notes.append(
            f"The guide is sequential, so the posterior mean of z_l averages E[z_l | z_(l-1)] over {draws} draws of "
            "the layers below."
        )
    if probes:
        base = next(iter(probes.values()))["majority_baseline"]
        notes.append(
            "Probe accuracy: multinomial logistic regression from the layer's posterior mean to the class, trained on "
            f"training-split codes, measured on these images (majority-class baseline {fmt(base)})."
        )
    if extra:
        notes.append(
            "Variance share: within-group pixel variance when only that layer is resampled, over the variance of "
            "independent ancestral samples. Class-change rate: how often resampling only that layer changes the "
            "classifier's prediction"
            + (
                f" (independent samples: {fmt(diag_block['baseline_class_change_rate'])})."
                if _is_number(diag_block.get("baseline_class_change_rate"))
                else "."
            )
        )
    else:
        notes.append("Variance share and class-change rates: not measured (no diagnostics block in eval.json).")
    return lines + [" ".join(notes), ""]


def _classifier_section(ev, gibbs) -> list:
    clf, q = ev.get("classifier"), ev.get("sample_quality")
    if not clf:
        return []
    rows = [["classifier test accuracy", clf.get("test_accuracy")]]
    if q:
        rows += [
            [f"Fréchet distance: ancestral samples vs {q['num_images']} images", q["fd_samples"]],
            ["Fréchet distance: training vs these images (floor)", q["fd_train_vs_eval"]],
        ]
    fd = gibbs.get("frechet_distance") if isinstance(gibbs, dict) else None
    if isinstance(fd, dict):
        n = f"{fd.get('num_images')} " + (f"chains at step {fd['step']}" if "step" in fd else "images")
        for key, value in fd.items():
            if _is_number(value) and key not in ("num_images", "reference_images", "step"):
                what = f"Gibbs chain keeping {key[6:]}" if key.startswith("gibbs_") else _label(key)
                rows.append([f"Fréchet distance: {what} ({n}, diagnostics)", value])
    lines = ["## Classifier and sample quality", ""] + _table(["quantity", "value"], rows)
    lines.append(
        "Fréchet distances are computed on the penultimate features of a small CNN trained on the training split "
        "(an FID with our own classifier); lower is better."
    )
    return lines + [""]


def _gibbs_section(gibbs) -> list:
    if not isinstance(gibbs, dict) or not gibbs:
        return []
    lines = ["## Gibbs chain", ""]
    settings = {k: v for k, v in gibbs.items() if _is_number(v)}
    if settings:
        lines += [", ".join(f"{_label(k)} {fmt(v)}" for k, v in settings.items()) + ".", ""]
    chains = gibbs.get("chains")
    if isinstance(chains, dict) and chains:
        cols = [c for c in _GIBBS_FIRST if any(_is_number(b.get(c)) for b in chains.values())]
        for block in chains.values():
            cols += [k for k, v in block.items() if _is_number(v) and k not in cols]
        rows = [[name] + [block.get(c) for c in cols] for name, block in chains.items()]
        collapse = {n: b["collapse"] for n, b in chains.items() if isinstance(b.get("collapse"), dict)}
        ccols = [c for c in COLLAPSE_COLUMNS if any(_is_number(v.get(c)) for v in collapse.values())]
        if collapse:
            rows = [r + [collapse.get(r[0], {}).get(c) for c in ccols] + [collapse.get(r[0], {}).get("collapsed")]
                    for r in rows]  # fmt: skip
        head = [_label(c) for c in cols] + ([_label(c) for c in ccols] + ["collapsed"] if collapse else [])
        lines += collapse_lines(collapse)
        lines += _table(["chain keeps"] + head, rows)
        lines += [
            "R-hat near 1 and a large effective sample size say only that the chains, started at different test "
            "images, forgot their starts (worst over the tracked statistics: mean intensity, each code, class "
            "probabilities); chains that all fall into the same degenerate state agree too. " + collapse_note(collapse),
            "",
        ]
    else:
        flat = {k: v for k, v in _flatten(gibbs).items() if k not in settings}
        lines += _table(["quantity", "value"], [[_label(k), _cell(v)] for k, v in flat.items()])
    return lines


def _share_table(a, key: str, assigned: str) -> list:
    """Layers by factors of ``a[key]``, each cell with its interval where ``a`` holds one, then the assignment row."""
    band = a.get(f"{key}_interval")

    def cell(i, k):
        v = a[key][i][k]
        return fmt(v) if not band or v is None else f"{fmt(v)} [{fmt(band['low'][i][k])}, {fmt(band['high'][i][k])}]"

    rows = [[layer] + [cell(i, k) for k in range(len(a["factors"]))] for i, layer in enumerate(a["layers"])]
    rows.append(["assigned layer"] + [a[assigned].get(f) for f in a["factors"]])
    return _table(["layer"] + list(a["factors"]), rows)


def _active_words(settings) -> str:
    if settings.get("active_criterion") == "explained_share":
        return f"active dims only (x explains over {settings.get('active_share', 0.01):.0%} of the dim's variance)"
    t = settings.get("active_variance")
    return "active dims only" + (f" (posterior-mean variance > {fmt(t)})" if t else "")


def _disentanglement_section(dis) -> list:
    if not dis:
        return []
    lines = ["## Disentanglement", ""]
    summary = dis["overall"]["summary"]
    cols = list(summary)
    rows = [["all layers"] + [summary[c] for c in cols]]
    for name, res in dis.get("layers", {}).items():
        rows.append([name] + [res.get("summary", {}).get(c) for c in cols])
    lines += _table(["codes"] + [_label(c) for c in cols], rows)
    a, settings = dis.get("assignment"), dis.get("settings") or {}
    active = _active_words(settings)
    if a and a.get("rule") == "top_dim":
        level = (a.get("bootstrap") or {}).get("level")
        band = f" ({level:.0%} bootstrap interval in brackets)" if level else ""
        lines += [f"Normalised information about each factor of each layer's best single dim{band}, over {active}."]
        lines += [RULE, ""] + _share_table(a, "best_unit_nmi", "assigned_layer")
        lines += [f"Share of each factor's mutual information carried by each layer, summed over its dims{band}.", ""]
        lines += _share_table(a, "mi_mass", "assigned_layer_by_mi_mass")
    elif a:  # an eval.json from before the best-dim rule: its headline was the summed share
        lines += [f"Share of each factor's mutual information carried by each layer, over {active}; assigned by "
                  "the summed share (an earlier rule: evaluate the run again for the best-dim rule).", ""]  # fmt: skip
        lines += _share_table(a, "mi_mass", "assigned_layer")
    if a and "importance_share" in a:
        lines += ["Share of each factor's DCI importance (fit on the active codes) carried by each layer.", ""]
        lines += _share_table(a, "importance_share", "assigned_layer_by_importance")
    lda = settings.get("dci_estimator") == "lda"
    dci = "DCI from the LDA variant, not comparable with published DCI" if lda else "DCI from gradient-boosted trees"
    lines.append(
        f"{dis.get('n_samples')} test items; MIG, SAP and DCI as defined in disentanglement_lib ({dci}, SAP from a "
        "linear SVM on each code dim; see `pyro_vlae.evaluation.disentangle`), on all codes. Per layer: MIG, MIG-sup "
        "and DCI informativeness over the layer's active dims, and SAP; no DCI disentanglement or completeness (`-`): "
        "with one or two dims per layer the estimator, not the data, would decide them."
    )
    return lines + [""]


def render_report(data: dict, config, figures: list, split: str = "test") -> str:
    """The Markdown text of a run's report.

    :param data: the contents of ``eval.json`` (must hold ``evaluation.<split>``).
    :param config: the run's :class:`~pyro_vlae.training.runs.RunConfig`.
    :param figures: PNG names under ``figures/`` (linked as ``figures/<name>``).
    :param split: which evaluation block to render.
    """
    ev = data["evaluation"][split]
    st = ev.get("settings", {})
    step = st.get("checkpoint_step", data.get("step"))
    name = MODEL_NAMES.get(config.model_kind, config.model_kind)
    lines = [f"# {name} on {config.dataset}: preset {config.preset}, {step} steps", ""]
    lines.append(
        f"Evaluated on {ev['likelihood']['num_images']} {split} images with K = {st.get('num_samples')} importance "
        f"samples per image (seed {st.get('seed')}, {st.get('device')}, {fmt(st.get('seconds'))} s). "
        f"Model: latent sizes {list(config.model.latent_dims)}, "
        f"{_LIKELIHOOD_NAMES.get(config.model.likelihood, config.model.likelihood)} likelihood."
    )
    lines.append("")
    lines += _likelihood_section(ev["likelihood"])
    if st.get("diagnostics") in ("skipped", "unavailable") and (data.get("layers") or data.get("gibbs")):
        lines += [
            "The variance-share, class-change and Gibbs-chain numbers below come from an earlier run of the "
            "diagnostics (they were not recomputed with this evaluation).",
            "",
        ]
    lines += _layers_section(ev, data.get("layers") if isinstance(data.get("layers"), dict) else {})
    lines += _classifier_section(ev, data.get("gibbs"))
    lines += _gibbs_section(data.get("gibbs"))
    if ev.get("diagnostics_error"):
        lines += [f"Diagnostics failed: `{ev['diagnostics_error']}`.", ""]
    lines += _disentanglement_section(ev.get("disentanglement"))
    if figures:
        lines += ["## Figures", ""]
        for f in figures:
            cap = figure_caption(f)
            lines += [f"![{cap}](figures/{f})", "", f"*{cap}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: str, data: dict, config, split: str = "test") -> str:
    """Render and atomically write ``run_dir/report.md``; returns its path."""
    path = os.path.join(run_dir, "report.md")
    atomic_write_text(path, render_report(data, config, list_figures(run_dir), split))
    return path
