"""Reproduce the paper's three claims side by side and print Markdown tables for ``benchmarks/RESULTS.md``.

MNIST: the VLAE and a 3-layer Markov HVAE of matched capacity (same preset: widths, latent sizes, likelihood), each
trained by ``python -m pyro_vlae.run`` with the same number of steps and evaluated by the end-of-run evaluation.
Sprites: VLAE, Markov HVAE and a beta-VAE baseline with the disentanglement metrics. shapes3d: the same three on
colour scenes, with the metrics per layer and each factor's layer (the colour hierarchy of Section 5).

    python benchmarks/claims/reproduce.py                       # both experiments, CPU-sized presets, 6000 / 3000 steps
    python benchmarks/claims/reproduce.py --only mnist --steps 6000
    python benchmarks/claims/reproduce.py --table-only          # rebuild the tables from runs already in --root
    python benchmarks/claims/reproduce.py --only shapes3d --runs vlae --no-eval --run-flags "--batch-size 50"
    python benchmarks/claims/reproduce.py --only mnist --runs hvae   # one run (several processes can share a --root)

Each run's folder (config, metrics, checkpoint, figures, eval.json, report.md) is kept under ``--root``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

#: The shapes3d code layout of the C4/C5 runs here and in benchmarks/gpu/paper_scale.py.
SHAPES3D_LAYOUT = "3,3,3,3"
# dataset -> [(tag, model, extra flags)]; the tag names the run folder and the table column.
EXPERIMENTS = {
    "mnist": [("vlae", "vlae", []), ("hvae", "hvae", [])],
    "sprites": [("vlae", "vlae", []), ("hvae", "hvae", []), ("vae-beta4", "vae", ["--beta", "4"])],
    # four 3-d layers, no fade-in: the layout the C5 pilot (c5_pilot.py, RESULTS.md "C5 pilot") chose as the one that
    # encodes every factor above chance and orders them (2-d layers leave structure out; 5,5,5,10 puts the object's
    # hue in its structure's layer; the fade-in reverses the order); the beta-VAE gets one code of the same total size
    "shapes3d": [
        ("vlae", "vlae", ["--latent-dims", SHAPES3D_LAYOUT]),
        ("hvae", "hvae", ["--latent-dims", SHAPES3D_LAYOUT]),
        ("vae-beta4", "vae", ["--latent-dims", str(sum(map(int, SHAPES3D_LAYOUT.split(",")))), "--beta", "4"]),
    ],
}
# Variants that test why a claim fails (run only when named with --runs).
VARIANTS = {
    "mnist": [
        ("hvae-bernoulli", "hvae", ["--likelihood", "bernoulli"]),
        ("hvae-z16", "hvae", ["--latent-dims", "16,16,16"]),
        ("hvae-z16-learned-sigma", "hvae", ["--latent-dims", "16,16,16", "--likelihood", "gaussian-learned"]),
    ],
    "sprites": [],
    "shapes3d": [],
}


def run_dir(root, dataset, tag):
    return os.path.join(root, f"{dataset}_{tag}")


def train(root, dataset, tag, model, extra, steps, seed, no_eval=False, run_flags=()):
    from pyro_vlae.run import main

    folder = run_dir(root, dataset, tag)
    if os.path.exists(os.path.join(folder, "eval.json")):
        print(f"[reproduce] {folder} already evaluated, skipping", flush=True)
        return folder
    argv = [
        "--model",
        model,
        "--dataset",
        dataset,
        "--num-steps",
        str(steps),
        "--seed",
        str(seed),
        "--run-dir",
        folder,
        "--no-progress",
        *(["--no-eval"] if no_eval else []),
        *extra,
        *run_flags,
    ]
    print(f"[reproduce] python -m pyro_vlae.run {' '.join(argv)}", flush=True)
    t0 = time.time()
    code = main(argv)
    print(f"[reproduce] exit {code} after {(time.time() - t0) / 60:.1f} min", flush=True)
    if code != 0:
        raise SystemExit(f"run {folder} failed with exit code {code}")
    return folder


def _get(d, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _layers(e):
    return sorted(_get(e, "evaluation", "test", "latents", default={}), key=lambda s: int(s[1:]))


def _table(folders, add_rows) -> str:
    """A Markdown table with one column per run; ``add_rows(row, evals)`` calls ``row(name, fn)`` per quantity."""
    evals = []
    for m, f in folders:
        with open(os.path.join(f, "eval.json")) as fh:
            evals.append((m, json.load(fh)))
    rows = ["| quantity | " + " | ".join(m for m, _ in folders) + " |", "|---|" + "---|" * len(folders)]

    def row(name, fn, nd=3):
        rows.append(f"| {name} | " + " | ".join(_fmt(fn(e), nd) for _, e in evals) + " |")

    add_rows(row, evals)
    return "\n".join(rows)


def mnist_table(folders) -> str:
    return _table(folders, _mnist_rows)


def sprites_table(folders) -> str:
    return _table(folders, _sprites_rows)


def shapes3d_table(folders) -> str:
    return _table(folders, _shapes3d_rows)


def _mnist_rows(row, evals):
    row("training steps", lambda e: e.get("step"))
    row("training minutes (machine shared with other runs)", lambda e: e.get("train_seconds", 0) / 60, nd=1)
    row("test ELBO (nats)", lambda e: _get(e, "evaluation", "test", "likelihood", "elbo"))
    row("IWAE log p(x) (nats)", lambda e: _get(e, "evaluation", "test", "likelihood", "iwae"))
    row("IWAE samples K", lambda e: _get(e, "evaluation", "test", "likelihood", "num_samples"))
    for l in _layers(evals[0][1]):
        row(f"KL {l}", lambda e, l=l: _get(e, "evaluation", "test", "latents", l, "kl"))
    for l in _layers(evals[0][1]):
        row(f"variance share {l}", lambda e, l=l: _get(e, "layers", "layers", l, "variance_share"))
    for l in _layers(evals[0][1]):
        row(f"class-change rate {l}", lambda e, l=l: _get(e, "layers", "layers", l, "class_change_rate"))
    row("class-change rate, independent samples", lambda e: _get(e, "layers", "baseline_class_change_rate"))
    for l in _layers(evals[0][1]):
        row(f"probe accuracy {l}", lambda e, l=l: _get(e, "evaluation", "test", "probes", l, "test_accuracy"))
    row("probe accuracy, all layers", lambda e: _get(e, "evaluation", "test", "probes", "all", "test_accuracy"))
    row("Fréchet distance, ancestral samples", lambda e: _get(e, "gibbs", "frechet_distance", "ancestral"))
    row("Fréchet distance, Gibbs chain on z1 (Eq. 6)", lambda e: _get(e, "gibbs", "frechet_distance", "gibbs_z1"))
    row("Fréchet distance, Gibbs chain on all z (Eq. 16)", lambda e: _get(e, "gibbs", "frechet_distance", "gibbs_all"))
    row("Gibbs z1 chain: max R-hat", lambda e: _get(e, "gibbs", "chains", "z1", "max_rhat"))
    row("classifier test accuracy", lambda e: _get(e, "evaluation", "test", "classifier", "test_accuracy"))


_DIS = ("evaluation", "test", "disentanglement")
_SCORES = ("mig", "mig_sup", "dci_disentanglement", "dci_completeness", "dci_informativeness", "sap")
_LAYER_SCORES = ("mig", "mig_sup", "dci_informativeness", "sap")


def _factor_names(evals):
    for _, e in evals:
        names = _get(e, *_DIS, "factor_names")
        if names:
            return names
    return []


def _sprites_rows(row, evals):
    row("training steps", lambda e: e.get("step"))
    row("test ELBO (nats)", lambda e: _get(e, "evaluation", "test", "likelihood", "elbo"))
    row("IWAE log p(x) (nats)", lambda e: _get(e, "evaluation", "test", "likelihood", "iwae"))
    for key in _SCORES:
        row(key, lambda e, key=key: _get(e, *_DIS, "overall", "summary", key))
    for f in _factor_names(evals):
        row(f"layer holding `{f}`", lambda e, f=f: _get(e, *_DIS, "assignment", "assigned_layer", f))


def _accuracy(d, k):
    if not d or d["informativeness_per_factor"][k] is None:
        return None
    return f"{d['informativeness_per_factor'][k]:.2f} ({d['chance_per_factor'][k]:.2f})"


def _shapes3d_rows(row, evals):
    row("training steps", lambda e: e.get("step"))
    row("training minutes (machine shared with other runs)", lambda e: e.get("train_seconds", 0) / 60, nd=1)
    row("test ELBO (nats)", lambda e: _get(e, "evaluation", "test", "likelihood", "elbo"))
    row("IWAE log p(x) (nats)", lambda e: _get(e, "evaluation", "test", "likelihood", "iwae"))
    layers = sorted({l for _, e in evals for l in _get(e, *_DIS, "layers", default={})}, key=lambda s: int(s[1:] or 0))
    for l in layers:
        row(f"KL {l} (nats)", lambda e, l=l: _get(e, "evaluation", "test", "latents", l, "kl"))
        row(f"active units {l}", lambda e, l=l: _get(e, "evaluation", "test", "latents", l, "active_units"))
        row(f"variance share {l}", lambda e, l=l: _get(e, "layers", "layers", l, "variance_share"))
    for key in _SCORES:  # a layer has no DCI disentanglement or completeness (see evaluation.assignment)
        row(f"{key}, all codes", lambda e, key=key: _get(e, *_DIS, "overall", "summary", key))
        if key == "mig":
            row("mig, active dims only", lambda e: _get(e, *_DIS, "active", "mig", "mig"))
        for l in layers if key in _LAYER_SCORES else ():
            row(f"{key}, {l} alone (active dims)", lambda e, key=key, l=l: _get(e, *_DIS, "layers", l, "summary", key))
    for k, f in enumerate(_factor_names(evals)):  # is the factor in the codes at all? (DCI's test accuracy)
        row(f"accuracy on `{f}` from all codes (chance)", lambda e, k=k: _accuracy(_get(e, *_DIS, "overall", "dci"), k))
    for how, key in (("best dim with intervals (headline)", "assigned_layer"),
                     ("summed information share", "assigned_layer_by_mi_mass"),
                     ("DCI importance", "assigned_layer_by_importance")):  # fmt: skip
        for f in _factor_names(evals):
            row(f"layer of `{f}` by {how}", lambda e, f=f, key=key: _get(e, *_DIS, "assignment", key, f))


def share_tables(folders, key="mi_mass") -> str:
    """Per run, a factor-by-layer table of ``assignment[key]``, over active dims: ``mi_mass`` (each factor's share of
    information per layer), ``importance_share`` (each factor's share of DCI importance per layer; ``-`` for a factor
    at chance) or ``best_unit_nmi`` (the normalised information of the layer's best single dim about the factor)."""
    out = []
    for tag, folder in folders:
        with open(os.path.join(folder, "eval.json")) as fh:
            a = _get(json.load(fh), *_DIS, "assignment")
        if not a:
            continue
        out += [f"\n{tag}: {key} (rows: factors; columns: layers)\n", "| factor | " + " | ".join(a["layers"]) + " |"]
        out.append("|---|" + "---|" * len(a["layers"]))
        for k, f in enumerate(a["factors"]):
            out.append(f"| {f} | " + " | ".join(_fmt(None if m[k] is None else float(m[k]), 2) for m in a[key]) + " |")
    return "\n".join(out)


TABLES = {"mnist": mnist_table, "sprites": sprites_table, "shapes3d": shapes3d_table}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/reproduce")
    p.add_argument("--only", choices=sorted(EXPERIMENTS))
    p.add_argument("--steps", type=int, help="steps per run (default: 6000 on mnist, 3000 otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--runs",
        nargs="+",
        metavar="TAG",
        help="train only these runs (tags: see EXPERIMENTS and VARIANTS); the tables still list every run already "
        "evaluated under --root. Lets runs go in parallel processes.",
    )
    p.add_argument("--table-only", action="store_true")
    p.add_argument(
        "--no-eval",
        action="store_true",
        help="train only (run with --no-eval); evaluate each folder afterwards with python -m pyro_vlae.evaluate",
    )
    p.add_argument(
        "--run-flags",
        default="",
        metavar="FLAGS",
        help="extra flags for every run, e.g. '--batch-size 50 --anneal exp:300' for a short CPU budget",
    )
    args = p.parse_args(argv)
    known = {tag for runs in (*EXPERIMENTS.values(), *VARIANTS.values()) for tag, _, _ in runs}
    if args.runs and not set(args.runs) <= known:
        p.error(f"unknown run tag(s) {sorted(set(args.runs) - known)}; choose from {sorted(known)}")
    for dataset in [args.only] if args.only else list(EXPERIMENTS):
        steps = args.steps or (6000 if dataset == "mnist" else 3000)
        folders = []
        for tag, model, extra in EXPERIMENTS[dataset] + VARIANTS[dataset]:
            folder = run_dir(args.root, dataset, tag)
            wanted = tag in args.runs if args.runs else (tag, model, extra) in EXPERIMENTS[dataset]
            if wanted and not args.table_only:
                train(
                    args.root, dataset, tag, model, extra, steps, args.seed, args.no_eval, shlex.split(args.run_flags)
                )
            if os.path.exists(os.path.join(folder, "eval.json")):
                folders.append((tag, folder))
        if folders:
            print(f"\n### {dataset}\n")
            print(TABLES[dataset](folders))
            if dataset in ("sprites", "shapes3d"):  # the tables' "layer of" rows
                from pyro_vlae.evaluation.assignment import RULE

                print(f"\n{RULE}")
            if dataset == "shapes3d":
                for key in ("mi_mass", "importance_share", "best_unit_nmi"):
                    print(share_tables(folders, key))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
