"""Proposition 1 on images (Fig. 2): the bottom-layer Gibbs chain of a Markov HVAE on dynamically binarised MNIST.

The model is Appendix B.1's Markov HVAE with a Bernoulli decoder (preset ``mnist-hvae-b1-bernoulli``: codes of 32, 16
and 8).  The chain of Eq. 6 feeds back *sampled* binary images, ``z1 ~ q(z1 | x(t))``, ``x(t+1) ~ p(x | z1)``, and
starts from three places: binarised test images (a seeded random draw from the whole test set), Bernoulli(0.5) noise
and binary ancestral samples.  At each
``t in --steps`` it reports, against binarised test images: the Fréchet distance of classifier features (a classifier
trained on binarised training images), with the floor (binarised training images against the same test images: the
reference, every test image that is not a chain start); the
predicted class frequencies against the test images'; the rate at which a chain's predicted class changes per step
(over the steps since the previous ``t``); and the collapse check of ``pyro_vlae.evaluation.diagnostics``.  Binary
ancestral samples of the whole model are the baseline.

Reproduced means, for every start: the chain's distance at t = 100 and t = 1000 is at most 1.5x the ancestral
samples', every class is within 3 points of its test frequency there, and classes switch (rate above 0.01 per step).

    python -m pyro_vlae.run --model hvae --dataset mnist --preset mnist-hvae-b1-bernoulli --run-dir RUN --no-eval
    python benchmarks/claims/gibbs_mnist.py train RUN --denoise          # variant: the guide sees corrupted inputs
    python benchmarks/claims/gibbs_mnist.py eval RUN [RUN ...]            # the chain protocol, tables, figure, verdict

``eval`` writes ``RUN/gibbs_mnist.json`` and ``RUN/figures/gibbs_mnist.png`` and exits 0 when every run reproduces
Fig. 2 by the target above, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_vlae as pv
from pyro_vlae.evaluation.classifier import extract_features, frechet_distance, get_classifier, predict
from pyro_vlae.evaluation.diagnostics import chain_collapse, jsonable
from pyro_vlae.experiments.gibbs import ancestral_draws, chain_snapshots
from pyro_vlae.training.annealing import KLSchedule
from pyro_vlae.training.checkpoint import atomic_write_json
from pyro_vlae.training.loop import BatchOrder, evaluate_elbo
from pyro_vlae.training.runs import save_run_checkpoint, write_config

STARTS = ("test", "noise", "ancestral")
FD_TARGET, CLASS_POINTS, MIN_SWITCH = 1.5, 3.0, 0.01


# ------------------------------------------------------------------------------------------------------ training
def corrupt(x: torch.Tensor) -> torch.Tensor:
    """The reference code's ``--denoise_train`` corruption: salt and pepper (each pixel kept with probability 0.9,
    then set with probability 0.1), plus Gaussian noise of scale 0.1, clipped to [0, 1]."""
    x = x * torch.bernoulli(torch.full_like(x, 0.9)) + torch.bernoulli(torch.full_like(x, 0.1))
    return (x + 0.1 * torch.randn_like(x)).clamp(0.0, 1.0)


def train(args) -> int:
    """Train the B.1 HVAE; with ``--denoise`` the guide is trained on corrupted copies of each batch while the model
    scores the clean batch (a denoising criterion: ``q(z | corrupt(x))`` must explain ``x``)."""
    p = pv.get_preset(args.preset)
    model_cfg = dataclasses.replace(p.model, latent_dims=tuple(args.latent_dims or p.model.latent_dims))
    train_cfg = dataclasses.replace(p.train, num_steps=args.num_steps or p.train.num_steps)
    extra = {"denoise": "reference --denoise_train: salt and pepper 0.1, N(0, 0.1)"} if args.denoise else {}
    config = pv.RunConfig("hvae", "mnist", p.name, model_cfg, train_cfg, args.seed, args.data_dir, extra)
    device = pv.resolve_device(args.device)
    bundle = pv.load_data("mnist", args.data_dir, train_cfg.batch_size, seed=args.seed)
    os.makedirs(args.run_dir, exist_ok=True)
    write_config(args.run_dir, config, sys.argv)
    pyro.set_rng_seed(args.seed)
    model, guide, optim, _ = pv.build(config, device)

    def noisy_guide(x, **kw):
        return guide(corrupt(x) if args.denoise else x, **kw)

    svi = SVI(model, noisy_guide, optim, Trace_ELBO())
    xs = bundle.tensors("train")[0].to(device)
    order, schedule = BatchOrder(xs.shape[0], train_cfg.batch_size, args.seed), KLSchedule(train_cfg.anneal)
    t0, step, total = time.time(), 0, 0.0
    with pyro.validation_enabled(False):
        while step < train_cfg.num_steps and time.time() - t0 < args.time_limit:
            total += svi.step(torch.bernoulli(xs[order.indices(step).to(device)]), kl_scale=schedule(step))
            step += 1
            if step % train_cfg.log_every == 0:
                print(f"step {step}: loss {total / train_cfg.log_every:.2f} ({time.time() - t0:.0f} s)", flush=True)
                total = 0.0
    save_run_checkpoint(args.run_dir, model, guide, optim, step, config)
    print(f"trained {step} steps ({step * train_cfg.batch_size / xs.shape[0]:.1f} epochs) in {time.time() - t0:.0f} s")
    return 0


# ------------------------------------------------------------------------------------------------------ protocol
def split_starts(num_test: int, num_starts: int, seed: int) -> tuple:
    """Indices of the chain starts, a seeded random draw of ``num_starts`` test images, and of the reference, all the
    others: disjoint, together the whole test set, each in ascending order.  (MNIST's test set is not shuffled: its
    first 5,000 images come from a cleaner set of writers, so the first images would be an easier start.)"""
    perm = torch.randperm(num_test, generator=torch.Generator().manual_seed(seed))
    return perm[:num_starts].sort().values, perm[num_starts:].sort().values


class Data:
    """Binarised MNIST (one seeded draw), the classifier trained on it, and the reference features."""

    def __init__(self, args, device):
        bundle = pv.load_data("mnist", args.data_dir, 100, seed=0)
        g = torch.Generator().manual_seed(1234)
        (xtr, ytr), (xte, yte) = bundle.tensors("train"), bundle.tensors("test")
        self.train = torch.bernoulli(xtr, generator=g)
        test = torch.bernoulli(xte, generator=g)
        n = args.chains
        self.start_idx, ref_idx = split_starts(len(test), n, args.seed)
        self.starts, self.reference = test[self.start_idx].to(device), test[ref_idx].to(device)
        self.clf, info = get_classifier(
            self.train, ytr, num_classes=10, cache_dir=os.path.join(args.data_dir, "classifiers"), x_test=test,
            y_test=yte, device=device, log=lambda m: print(m, flush=True),
        )  # fmt: skip
        self.accuracy = info["test_accuracy"]
        self.ref_feats = extract_features(self.clf, self.reference)
        self.ref_freq = class_freq(predict(self.clf, self.reference))
        self.floor = frechet_distance(extract_features(self.clf, self.train[:n].to(device)), self.ref_feats)


def class_freq(pred: torch.Tensor) -> list:
    return (torch.bincount(pred.flatten().cpu(), minlength=10).double() / pred.numel()).tolist()


def score(data: Data, images: torch.Tensor, fd_anc=None) -> dict:
    """Fréchet distance, class frequencies (and their worst gap to the test images', in points) and collapse."""
    fd = frechet_distance(extract_features(data.clf, images), data.ref_feats)
    freq = class_freq(predict(data.clf, images))
    gap = max(abs(a - b) for a, b in zip(freq, data.ref_freq)) * 100
    out = {"fd": fd, "class_freq": freq, "max_class_gap_points": gap}
    if fd_anc is not None:
        out["collapse"] = chain_collapse(images, data.reference, data.clf, fd, fd_anc)
    return out


def protocol(run_dir: str, data: Data, args, device) -> dict:
    model, guide, config, state = pv.load_run(run_dir, device)
    n, steps = args.chains, sorted(args.steps)
    batches = (x for x in data.reference.split(500))  # already binary
    res = {"run_dir": run_dir, "step": int(state["step"]), "latent_dims": list(config.model.latent_dims)}
    res["test_starts"] = f"{n} test images drawn by seed {args.seed}, disjoint from the {len(data.reference)} reference"
    res["extra"], res["test_elbo"] = config.extra, evaluate_elbo(model, guide, batches, max_batches=4).get("elbo")
    anc = ancestral_draws(model, n, seed=args.seed)
    res["ancestral"] = score(data, anc)
    fd_anc = res["ancestral"]["fd"]
    x0 = {
        "test": data.starts,
        "noise": torch.bernoulli(torch.full_like(data.starts, 0.5), generator=torch.Generator(device).manual_seed(3)),
        "ancestral": ancestral_draws(model, n, seed=args.seed + 1),
    }
    res["starts"], shown = {}, {}
    for i, (name, start) in enumerate(x0.items()):
        t0 = time.time()
        prev = {"pred": predict(data.clf, start[: args.switch_chains]), "switches": {}}
        start_pred = prev["pred"].clone()

        def on_step(t, x, mean, prev=prev):
            pred = predict(data.clf, x[: args.switch_chains])
            window = next(s for s in steps if s >= t)
            prev["switches"].setdefault(window, []).append((pred != prev["pred"]).double().mean().item())
            prev["pred"] = pred

        snaps = chain_snapshots(model, guide, start, steps, seed=args.seed + 10 + i, on_step=on_step)
        block = {"start": score(data, start), "t": {}}
        for t in steps:
            block["t"][t] = score(data, snaps[t]["states"], fd_anc)
            block["t"][t]["switch_rate"] = sum(prev["switches"][t]) / len(prev["switches"][t])
            if name == "test":
                kept = predict(data.clf, snaps[t]["states"][: args.switch_chains]) == start_pred
                block["t"][t]["start_class_kept"] = kept.double().mean().item()
        block["seconds"] = time.time() - t0
        res["starts"][name], shown[name] = block, (start, snaps)
    res["verdict"] = verdict(res, steps)
    figure(os.path.join(run_dir, "figures", "gibbs_mnist.png"), res, shown, anc, steps, config)
    atomic_write_json(os.path.join(run_dir, "gibbs_mnist.json"), jsonable({**res, "floor": data.floor}))
    return res


def verdict(res: dict, steps) -> dict:
    """The target, start by start: distance <= 1.5x ancestral and classes within 3 points at t = 100 and 1000 (the
    two largest ``steps``), and classes switching over the last window."""
    fd_anc, out = res["ancestral"]["fd"], {}
    late = [t for t in steps if t >= 100] or steps[-2:]
    for name, block in res["starts"].items():
        checks = {f"fd_t{t}_within_{FD_TARGET}x_ancestral": block["t"][t]["fd"] <= FD_TARGET * fd_anc for t in late} | {
            f"classes_t{t}_within_{CLASS_POINTS:g}_points": block["t"][t]["max_class_gap_points"] <= CLASS_POINTS
            for t in late
        }
        checks["classes_switch"] = block["t"][steps[-1]]["switch_rate"] > MIN_SWITCH
        checks["no_collapse"] = not any(block["t"][t]["collapse"]["collapsed"] for t in late)
        out[name] = {"checks": checks, "reproduced": all(checks.values())}
    out["reproduced"] = all(v["reproduced"] for v in out.values())
    return out


def figure(path, res, shown, anc, steps, config) -> None:
    """Fig. 2: one row per start (the start, then the chain's binary states at each t), ancestral samples beside."""
    import matplotlib.pyplot as plt

    from pyro_vlae.figures import _save
    from pyro_vlae.plotting import image_grid

    cols = len(steps) + 2
    fig, axes = plt.subplots(len(shown), cols, figsize=(2.3 * cols, 2.6 * len(shown) + 0.5), squeeze=False)
    for r, (name, (start, snaps)) in enumerate(shown.items()):
        block = res["starts"][name]
        cells = [(f"start: {name}\nFD {block['start']['fd']:.1f}", start)]
        cells += [(f"t = {t}\nFD {block['t'][t]['fd']:.1f}", snaps[t]["states"]) for t in steps]
        if r == 0:
            cells.append((f"ancestral samples\nFD {res['ancestral']['fd']:.1f}", anc))
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(cells):
                ax.imshow(image_grid(cells[c][1][:36].float(), 6), cmap="gray", vmin=0, vmax=1)
                ax.set_title(cells[c][0], fontsize=9)
    fig.suptitle(
        f"{config.preset}, codes {list(config.model.latent_dims)}, step {res['step']}: Gibbs chain on z1 (Eq. 6), "
        "binary states fed back; FD vs binarised test images",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, path)


# ------------------------------------------------------------------------------------------------------ tables
def tables(results: list, data: Data, steps) -> str:
    f = lambda v: "-" if v is None else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"  # noqa: E731
    lines = [
        f"Classifier (trained on binarised training images) test accuracy {data.accuracy:.4f}; Fréchet-distance floor "
        f"(as many binarised training images against the same test images): {data.floor:.1f}",
        "",
        "| run | step | codes | test ELBO | FD ancestral | start | "
        + " | ".join(f"FD t={t}" for t in steps)
        + " | "
        + " | ".join(f"class gap t={t}" for t in steps)
        + " | "
        + " | ".join(f"switch t={t}" for t in steps)
        + " | collapse t="
        + str(steps[-1])
        + " | reproduced |",
        "|" + "---|" * (7 + 3 * len(steps) + 1),
    ]
    for r in results:
        for name, b in r["starts"].items():
            col = b["t"][steps[-1]]["collapse"]
            lines.append(
                f"| {r['run_dir']} | {r['step']} | {'/'.join(map(str, r['latent_dims']))} | {f(r['test_elbo'])} | "
                f"{f(r['ancestral']['fd'])} | {name} | "
                + " | ".join(f(b["t"][t]["fd"]) for t in steps)
                + " | "
                + " | ".join(f(b["t"][t]["max_class_gap_points"]) for t in steps)
                + " | "
                + " | ".join(f(b["t"][t]["switch_rate"]) for t in steps)
                + f" | {'; '.join(col['reasons']) or 'no'} | {'yes' if r['verdict'][name]['reproduced'] else 'no'} |"
            )
    lines += ["", "Class frequencies (%) at the last step, against the binarised test images' predicted classes:", ""]
    lines += ["| run | images | " + " | ".join(map(str, range(10))) + " |", "|" + "---|" * 12]
    lines.append("| test images | - | " + " | ".join(f"{100 * v:.1f}" for v in data.ref_freq) + " |")
    for r in results:
        lines.append(
            f"| {r['run_dir']} | ancestral samples (baseline) | "
            + " | ".join(f"{100 * v:.1f}" for v in r["ancestral"]["class_freq"])
            + " |"
        )
        for name, b in r["starts"].items():
            freq = b["t"][steps[-1]]["class_freq"]
            lines.append(
                f"| {r['run_dir']} | chain from {name} start | " + " | ".join(f"{100 * v:.1f}" for v in freq) + " |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a B.1 HVAE variant (the plain one: python -m pyro_vlae.run, see above)")
    tr.add_argument("run_dir")
    tr.add_argument("--preset", default="mnist-hvae-b1-bernoulli")
    tr.add_argument("--num-steps", type=int)
    tr.add_argument("--latent-dims", type=lambda s: [int(v) for v in s.split(",")])
    tr.add_argument("--denoise", action="store_true", help="train the guide on corrupted inputs")
    tr.add_argument("--time-limit", type=float, default=math.inf, help="seconds; stop early and checkpoint")
    ev = sub.add_parser("eval", help="the chain protocol on trained runs")
    ev.add_argument("run_dirs", nargs="+")
    ev.add_argument("--chains", type=int, default=500, help="chains per start (and images per Fréchet distance)")
    ev.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[1, 10, 100, 1000])
    ev.add_argument("--switch-chains", type=int, default=200, help="chains classified at every step")
    for p in (tr, ev):
        p.add_argument("--device", default="auto")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--data-dir", default="data")
    args = ap.parse_args(argv)
    if args.cmd == "train":
        return train(args)
    if not 2 <= args.chains <= 5000:
        ap.error(
            f"--chains must be between 2 and 5000 (test images are split into starts and reference), got {args.chains}"
        )
    device = pv.resolve_device(args.device)
    data = Data(args, device)
    results = [protocol(d, data, args, device) for d in args.run_dirs]
    print(tables(results, data, sorted(args.steps)))
    ok = all(r["verdict"]["reproduced"] for r in results)
    for r in results:
        failed = {s: [k for k, v in r["verdict"][s]["checks"].items() if not v] for s in STARTS}
        print(
            f"VERDICT {r['run_dir']}: Fig. 2 {'REPRODUCED' if r['verdict']['reproduced'] else 'NOT reproduced'}"
            + ("" if r["verdict"]["reproduced"] else f" (failed: {failed})")
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
