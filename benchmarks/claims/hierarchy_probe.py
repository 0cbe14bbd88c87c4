"""How cleanly a trained MNIST run separates digit identity across layers.

For each layer, resample that layer alone (50 groups x 20 draws, other layers fixed per group) and report how often the
digit classifier's prediction changes against the group's first image, plus the share of pixel variance.  Used to
compare schedules for the CPU-sized default job; see benchmarks/RESULTS.md.  The model is the one trained up to the
checkpoint, with the ladder gains of its fade-in (printed as ``ladder_gain``, for z1 .. z(L-1)).

    python benchmarks/claims/hierarchy_probe.py RUN_DIR [--checkpoint step2000.pt] [--cache data/classifiers] \
        [--device cuda]
"""

import argparse
import json

import torch

from pyro_vlae.data import load_data
from pyro_vlae.evaluation.classifier import get_classifier, predict
from pyro_vlae.experiments import interventions as iv
from pyro_vlae.training.runs import load_run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default="latest.pt")
    p.add_argument("--cache", default="data/classifiers", help="classifier cache folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda (model, and classifier training on a cache miss)")
    args = p.parse_args(argv)
    model, guide, cfg, state = load_run(args.run_dir, device=args.device, checkpoint=args.checkpoint)
    bundle = load_data(cfg.dataset, cfg.data_dir, 100)
    (x, y), (xt, yt) = bundle.tensors("train"), bundle.tensors("test")
    clf, info = get_classifier(
        x, y, num_classes=10, cache_dir=args.cache, x_test=xt, y_test=yt, device=args.device, log=lambda *a: None
    )
    g = torch.Generator().manual_seed(0)
    out = {"step": state["step"], "classifier_accuracy": info["test_accuracy"], "class_change": {}}
    if hasattr(model, "ladder_gain"):
        out["ladder_gain"] = [round(g, 4) for g in model.ladder_gain.tolist()]
    for site in model.latent_sites:
        imgs = iv.intervene_layer(model, site, 50, 20, generator=g)
        groups, draws = imgs.shape[:2]
        pred = predict(clf, imgs.reshape(groups * draws, *imgs.shape[2:])).reshape(groups, draws)
        out["class_change"][site] = round(float((pred != pred[:, :1]).float()[:, 1:].mean()), 3)
    out["variance_share"] = {k: round(v, 3) for k, v in iv.variance_share(model).items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
