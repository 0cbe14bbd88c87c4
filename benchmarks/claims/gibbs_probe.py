"""Why a Gibbs chain on the bottom layer drifts: sample quality along the chain, fed draws or mean images.

For a trained run, start ``--chains`` chains at test images and follow the chain of Eq. 6 (``z1 ~ q(z1|x)``, then
``x ~ p(x|z1)``, the draw fed back) and its diagnostic variant that feeds back the mean image of ``p(x|z1)``.  At
each listed step it reports the Fréchet distance of the chains' mean images to the test set (classifier features, as
in the evaluation), and the share still classified as their start image.  Two references with the same number of
images: ancestral samples from the whole model, and held-out test images (the small-sample floor of the distance).

If the draw-fed chain drifts and the mean-fed one does not, the likelihood's noise, which takes the images off the
data the guide was trained on, is the cause rather than the guide's error alone.

    python benchmarks/claims/gibbs_probe.py RUN_DIR [RUN_DIR ...] [--chains 200] [--steps 1 2 5 10 25 50 100]

It prints one JSON line per run, then Markdown tables (one per feed) with a row per run.
"""

import argparse
import json

import torch

from pyro_vlae.data import load_data
from pyro_vlae.evaluation.classifier import extract_features, frechet_distance, get_classifier, predict
from pyro_vlae.experiments.gibbs import ancestral_means, chain_starts, gibbs_chain
from pyro_vlae.training.runs import load_run


def probe(run_dir, args) -> dict:
    """The probe of one run (see the module docstring)."""
    model, guide, cfg, state = load_run(run_dir, checkpoint=args.checkpoint)
    size = cfg.model.image_shape[-1]
    bundle = load_data(cfg.dataset, cfg.data_dir, 100, seed=cfg.seed, sprites_size=size, celeba_size=size)
    if not bundle.num_classes:
        raise SystemExit(f"{cfg.dataset} has no class labels: the probe needs a classifier for its features")
    (x, y), (xt, yt) = bundle.tensors("train"), bundle.tensors("test")
    if xt.shape[0] < args.reference + 2 * args.chains:
        raise SystemExit(f"need {args.reference + 2 * args.chains} test images, the test set has {xt.shape[0]}")
    clf, info = get_classifier(
        x, y, num_classes=bundle.num_classes, cache_dir=args.cache, x_test=xt, y_test=yt, log=lambda *a: None
    )
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(xt.shape[0], generator=g)
    ref = extract_features(clf, xt[perm[: args.reference]])
    held_out = xt[perm[args.reference : args.reference + args.chains]]
    starts = chain_starts(model, xt[perm[args.reference + args.chains :]], args.chains, args.seed)

    def fd(imgs):
        return round(frechet_distance(extract_features(clf, imgs), ref), 1)

    start_class = predict(clf, starts)
    out = {
        "run": run_dir,
        "model": cfg.model_kind,
        "step": state["step"],
        "likelihood": cfg.model.likelihood,
        "latent_dims": list(cfg.model.latent_dims),
        "chains": args.chains,
        "fd_test_images": fd(held_out),
        "fd_ancestral": fd(ancestral_means(model, args.chains, seed=args.seed)),
        "fd_starts": fd(starts),
    }
    steps = sorted(set(args.steps))
    for feed in ("sample", "mean"):
        res = gibbs_chain(model, guide, starts, steps[-1], seed=args.seed, feed=feed)
        rows = {}
        for t in steps:
            imgs = res.means[t - 1]  # mean image of p(x | z1^(t-1)): the chain's state after t transitions
            kept = (predict(clf, imgs) == start_class).float().mean().item()
            rows[t] = {"fd": fd(imgs), "start_class_kept": round(kept, 3)}
        out[f"feed_{feed}"] = rows
    return out


def table(results, feed: str) -> str:
    """Markdown: one row per run, the Fréchet distance (and share of chains on their start class) at each step."""
    steps = list(results[0][f"feed_{feed}"])
    head = "| run | model | steps | likelihood | codes | FD ancestral | " + " | ".join(f"t={t}" for t in steps) + " |"
    rows = [head, "|---" * (6 + len(steps)) + "|"]
    for r in results:
        cells = [f"{c['fd']:.0f} ({c['start_class_kept']:.2f})" for c in r[f"feed_{feed}"].values()]
        dims = "x".join(str(d) for d in r["latent_dims"])
        rows.append(
            f"| {r['run']} | {r['model']} | {r['step']} | {r['likelihood']} | {dims} | {r['fd_ancestral']:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--checkpoint", default="latest.pt")
    p.add_argument("--chains", type=int, default=200)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 25, 50, 100])
    p.add_argument("--reference", type=int, default=2000, help="test images the distances are measured against")
    p.add_argument("--cache", default="data/classifiers", help="classifier cache folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    results = []
    for run_dir in args.run_dirs:
        results.append(probe(run_dir, args))
        print(json.dumps(results[-1]), flush=True)
    floor = results[0]["fd_test_images"]
    for feed, what in (("sample", "draws fed back (Eq. 6)"), ("mean", "mean images fed back (diagnostic)")):
        print(f"\n#### Gibbs chain on z1, {what}: Fréchet distance at step t (share on the start class)\n")
        print(table(results, feed))
    print(f"\nFréchet distance of {args.chains} held-out test images (the small-sample floor): {floor:.1f}")


if __name__ == "__main__":
    main()
