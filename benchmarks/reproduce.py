"""Reproduce the paper's three claims side by side and print Markdown tables for ``benchmarks/RESULTS.md``.

MNIST: the VLAE and a 3-layer Markov HVAE of matched capacity (same preset: widths, latent sizes, likelihood), each
trained by ``python -m pyro_vlae.run`` with the same number of steps and evaluated by the end-of-run evaluation.
Sprites: VLAE, Markov HVAE and a beta-VAE baseline with the disentanglement metrics.

    python benchmarks/reproduce.py                         # both experiments, CPU-sized presets, 6000 / 3000 steps
    python benchmarks/reproduce.py --only mnist --steps 6000
    python benchmarks/reproduce.py --table-only            # rebuild the tables from runs already in --root
    python benchmarks/reproduce.py --only mnist --runs hvae   # one run (several processes can share a --root)

Each run's folder (config, metrics, checkpoint, figures, eval.json, report.md) is kept under ``--root``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# dataset -> [(tag, model, extra flags)]; the tag names the run folder and the table column.
EXPERIMENTS = {
    "mnist": [("vlae", "vlae", []), ("hvae", "hvae", [])],
    "sprites": [("vlae", "vlae", []), ("hvae", "hvae", []), ("vae-beta4", "vae", ["--beta", "4"])],
}
# Variants that test why a claim fails (run only when named with --runs).
VARIANTS = {
    "mnist": [
        ("hvae-bernoulli", "hvae", ["--likelihood", "bernoulli"]),
        ("hvae-z16", "hvae", ["--latent-dims", "16,16,16"]),
        ("hvae-z16-learned-sigma", "hvae", ["--latent-dims", "16,16,16", "--likelihood", "gaussian-learned"]),
    ],
    "sprites": [],
}


def run_dir(root, dataset, tag):
    return os.path.join(root, f"{dataset}_{tag}")


def train(root, dataset, tag, model, extra, steps, seed):
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
        *extra,
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


def _sprites_rows(row, evals):
    row("training steps", lambda e: e.get("step"))
    row("test ELBO (nats)", lambda e: _get(e, "evaluation", "test", "likelihood", "elbo"))
    row("IWAE log p(x) (nats)", lambda e: _get(e, "evaluation", "test", "likelihood", "iwae"))
    summary = ("overall", "summary")
    for key in ("mig", "mig_sup", "dci_disentanglement", "dci_completeness", "dci_informativeness", "sap"):
        row(key, lambda e, key=key: _get(e, "evaluation", "test", "disentanglement", *summary, key))
    for _, e in evals:
        a = _get(e, "evaluation", "test", "disentanglement", "assignment", "assigned_layer")
        if a:
            break
    factors = list(a) if a else []
    for f in factors:
        row(
            f"layer holding `{f}`",
            lambda e, f=f: _get(e, "evaluation", "test", "disentanglement", "assignment", "assigned_layer", f),
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/reproduce")
    p.add_argument("--only", choices=sorted(EXPERIMENTS))
    p.add_argument("--steps", type=int, help="steps per run (default: 6000 on mnist, 3000 on sprites)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--runs",
        nargs="+",
        metavar="TAG",
        help="train only these runs (tags: see EXPERIMENTS and VARIANTS); the tables still list every run already "
        "evaluated under --root. Lets runs go in parallel processes.",
    )
    p.add_argument("--table-only", action="store_true")
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
                train(args.root, dataset, tag, model, extra, steps, args.seed)
            if os.path.exists(os.path.join(folder, "eval.json")):
                folders.append((tag, folder))
        if folders:
            print(f"\n### {dataset}\n")
            print((mnist_table if dataset == "mnist" else sprites_table)(folders))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
