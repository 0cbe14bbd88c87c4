"""Why a Gibbs chain on the bottom layer drifts: sample quality along the chain, fed draws or mean images.

For a trained run, start ``--chains`` chains at test images and follow the chain of Eq. 6 (``z1 ~ q(z1|x)``, then
``x ~ p(x|z1)``, the draw fed back) and its diagnostic variant that feeds back the mean image of ``p(x|z1)``.  At
each listed step it reports the Fréchet distance of the chains' mean images to the test set (classifier features, as
in the evaluation), and the share still classified as their start image.  Two references with the same number of
images: ancestral samples from the whole model, and held-out test images (the small-sample floor of the distance).

If the draw-fed chain drifts and the mean-fed one does not, the likelihood's noise, which takes the images off the
data the guide was trained on, is the cause rather than the guide's error alone.

    python benchmarks/gibbs_probe.py RUN_DIR [--chains 200] [--steps 1 2 5 10 25 50 100]
"""

import argparse
import json

import torch

from pyro_vlae.classifier import extract_features, frechet_distance, get_classifier, predict
from pyro_vlae.data import load_data
from pyro_vlae.gibbs import ancestral_means, chain_starts, gibbs_chain
from pyro_vlae.train import load_run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default="latest.pt")
    p.add_argument("--chains", type=int, default=200)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 25, 50, 100])
    p.add_argument("--reference", type=int, default=2000, help="test images the distances are measured against")
    p.add_argument("--cache", default="data/classifiers", help="classifier cache folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model, guide, cfg, state = load_run(args.run_dir, checkpoint=args.checkpoint)
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
        "run": args.run_dir,
        "step": state["step"],
        "likelihood": cfg.model.likelihood,
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
    print(json.dumps(out))


if __name__ == "__main__":
    main()
