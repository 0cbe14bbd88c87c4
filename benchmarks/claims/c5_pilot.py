"""C5 pilot: which shapes3d code layout can show the colour hierarchy (Section 5, Fig. 6-7) at a CPU budget?

Trains ``shapes3d-32`` VLAEs with several code layouts at equal images seen, with and without the progressive fade-in
of the lower layers, evaluates each (disentanglement per layer, every assignment rule, active dims per layer) and
prints one Markdown report.  It chooses nothing by itself: the report shows, per run, which layer holds each factor and
whether each factor is encoded above chance at all, and the reader picks the layout that encodes every factor.

    OMP_NUM_THREADS=1 python benchmarks/claims/c5_pilot.py                       # train (2 at a time), evaluate, report
    python benchmarks/claims/c5_pilot.py --phase train --runs vlae-5-5-5-10-fade vlae-3-3-3-3-fade
    python benchmarks/claims/c5_pilot.py --phase evaluate                        # every trained run without eval.json
    python benchmarks/claims/c5_pilot.py --phase report > pilot.md               # tables only, from eval.json files
    python benchmarks/claims/c5_pilot.py --runs c4-hvae c4-vae-beta4 --c4-layout 5,5,5,10   # the fair C4 comparison

Each run is ``python -m pyro_vlae.run`` in its own process with one torch thread (``OMP_NUM_THREADS=1``), at most
``--jobs`` at a time, in ``--root/<tag>``.  Resumable: a run with ``checkpoints/latest.pt`` short of its steps is
continued with ``--resume``; a finished run is skipped; a run already evaluated is not evaluated again.  A SIGTERM
or Ctrl-C stops the children (each writes its checkpoint) and a later call continues them.  ``--budget-minutes`` stops
launching new work once that much wall time has passed (running work finishes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from reproduce import _accuracy, _get, share_tables  # noqa: E402

#: The fade-in, in steps per layer (``--fade-in``): the top code alone first, each lower layer joining over the next
#: ``FADE_IN`` steps; with 4 layers every gain is 1 from step 1200 of the default 2000.
FADE_IN = 300
#: pro-VLAE's 3dshapes setting: 3 layers of 3-d codes with a KL weight beta = 8, here a constant KL scale of 8
#: (``--anneal const:8``: the KL-scale schedule takes any scale > 0; the model and guide apply it with poutine.scale).
BETA_PRO = 8


def _vlae(dims, fade, extra=()):
    tag = "vlae-" + dims.replace(",", "-") + ("-fade" if fade else "")
    return tag, "vlae", ["--latent-dims", dims, *(["--fade-in", str(FADE_IN)] if fade else []), *extra]


#: tag -> (model, flags).  The issue's layouts: today's 2,2,2,2, 3,3,3,3 and the paper's SVHN sizes 5,5,5,10, each with
#: and without the fade-in, and pro-VLAE's 3,3,3 with beta = 8 (with its progressive fade-in).
LAYOUTS = dict(
    (tag, (model, flags))
    for tag, model, flags in [
        _vlae("5,5,5,10", True),
        _vlae("3,3,3,3", True),
        _vlae("5,5,5,10", False),
        _vlae("3,3,3,3", False),
        _vlae("2,2,2,2", True),
        _vlae("2,2,2,2", False),
        ("vlae-3-3-3-fade-beta8", "vlae", ["--latent-dims", "3,3,3", "--fade-in", str(FADE_IN), "--anneal",
                                           f"const:{BETA_PRO}"]),
    ]
)  # fmt: skip


def c4_runs(layout: str) -> dict:
    """The fair comparison for C4 at ``layout``: the Markov HVAE with the same layer sizes and the beta-VAE (beta 4,
    as reproduce.py) with one code of the same total size."""
    total = sum(int(d) for d in layout.split(","))
    return {
        "c4-hvae": ("hvae", ["--latent-dims", layout]),
        "c4-vae-beta4": ("vae", ["--latent-dims", str(total), "--beta", "4"]),
    }


#: The evaluation: IWAE on 1000 test images, the disentanglement scores and assignments on 2000 test items with
#: disentanglement_lib's gradient-boosted trees; no Gibbs or intervention diagnostics (the training's figures show the
#: interventions and traversals, which the report's reader looks at).
EVAL_FLAGS = ["--num-samples", "10", "--max-images", "1000", "--no-classifier", "--dci", "gbt",
              "--disentangle-images", "2000", "--no-diagnostics"]  # fmt: skip


def _latest_step(folder):
    try:
        with open(os.path.join(folder, "metrics.jsonl")) as fh:
            lines = [json.loads(s) for s in fh if s.strip()]
    except OSError:
        return 0
    return max((d.get("step", 0) for d in lines), default=0)


def _done(folder, steps) -> bool:
    return os.path.exists(os.path.join(folder, "figures")) and _latest_step(folder) >= steps


def _evaluated(folder) -> bool:
    """``eval.json`` exists after training too (its ELBO block); the evaluation adds ``evaluation``."""
    try:
        with open(os.path.join(folder, "eval.json")) as fh:
            return "evaluation" in json.load(fh)
    except (OSError, ValueError):
        return False


def train_cmd(root, tag, model, flags, steps, seed):
    folder = os.path.join(root, tag)
    if os.path.exists(os.path.join(folder, "checkpoints", "latest.pt")):
        return [sys.executable, "-m", "pyro_vlae.run", "--resume", folder, "--num-steps", str(steps), "--no-eval",
                "--no-progress"]  # fmt: skip
    return [
        sys.executable, "-m", "pyro_vlae.run", "--model", model, "--dataset", "shapes3d", "--preset", "shapes3d-32",
        "--batch-size", "100", "--num-steps", str(steps), "--seed", str(seed), "--checkpoint-every", "500",
        "--run-dir", folder, "--no-eval", "--no-progress", *flags,
    ]  # fmt: skip


def eval_cmd(root, tag):
    return [sys.executable, "-m", "pyro_vlae.evaluate", os.path.join(root, tag), *EVAL_FLAGS]


def run_pool(jobs, width: int, deadline: float, log=print) -> dict:
    """Run ``jobs`` (``[(name, argv, logfile)]``) at most ``width`` at a time, one torch thread each; stop launching
    at ``deadline``.  A SIGTERM/SIGINT is passed on to the children, which write their checkpoints.

    :returns: ``{name: exit code}`` of the jobs that ran."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending, running, codes = list(jobs), {}, {}
    stopping = []

    def _stop(signum, frame):
        stopping.append(signum)
        for p, _ in running.values():
            p.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or running:
            while pending and len(running) < width and not stopping and time.time() < deadline:
                name, argv, logfile = pending.pop(0)
                log(f"[pilot] start {name}: {' '.join(argv[1:])}")
                fh = open(logfile, "a")
                running[name] = (subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env), fh)
            if not running:
                break
            time.sleep(2)
            for name, (p, fh) in list(running.items()):
                if p.poll() is not None:
                    fh.close()
                    codes[name] = p.returncode
                    log(f"[pilot] {name} exited {p.returncode}")
                    del running[name]
        for name, *_ in pending:
            log(f"[pilot] {name} not started (budget or stop)")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return codes


def _layers(e):
    return sorted(_get(e, "evaluation", "test", "latents", default={}), key=lambda s: int(s[1:]))


_DIS = ("evaluation", "test", "disentanglement")
#: The evaluation's assignment rules: the headline (each layer's best single dim, named only when it leads by 2x with
#: a bootstrap interval clear of the runner-up's), the summed information over a layer's dims (which duplicated dims
#: can win) and the share of DCI importance.
_RULES = (("best dim (headline)", "assigned_layer"), ("summed MI", "assigned_layer_by_mi_mass"),
          ("DCI importance", "assigned_layer_by_importance"))  # fmt: skip


def run_summary(tag, e) -> list[str]:
    """Markdown lines for one evaluated run: KL and active dims per layer, then per factor the layer by each rule,
    the best single dim's normalised information in that layer, and DCI's accuracy from all codes against chance."""
    a = _get(e, *_DIS, "assignment", default={}) or {}
    layers = _layers(e)
    out = [f"\n#### {tag} (step {e.get('step')})\n"]
    kl = " / ".join(f"{_get(e, 'evaluation', 'test', 'latents', l, 'kl', default=float('nan')):.2f}" for l in layers)
    act = " / ".join(str(_get(e, "evaluation", "test", "latents", l, "active_units", default="-")) for l in layers)
    out.append(f"KL per layer {' / '.join(layers)} (nats): {kl}; active dims per layer: {act}; test ELBO "
               f"{_get(e, 'evaluation', 'test', 'likelihood', 'elbo', default=float('nan')):.1f}\n")  # fmt: skip
    rules = " | ".join(f"layer by {r}" for r, _ in _RULES)
    out.append(f"| factor | accuracy (chance) | {rules} | best-dim NMI per layer [95 % interval] |")
    out.append("|---|---|" + "---|" * len(_RULES) + "---|")
    factors = a.get("factors") or _get(e, *_DIS, "factor_names", default=[]) or []
    nmi = a.get("best_unit_nmi")
    for k, f in enumerate(factors):
        acc = _accuracy(_get(e, *_DIS, "overall", "dci"), k) or "-"
        rules = [_layer(a, key, f) for _, key in _RULES]
        best = " / ".join(_nmi(nmi, a.get("best_unit_nmi_interval"), l, k) for l in range(len(nmi))) if nmi else "-"
        out.append(f"| {f} | {acc} | " + " | ".join(rules) + f" | {best} |")
    return out


def _layer(a, key, factor) -> str:
    """A rule's layer for ``factor``; the evaluation's ``None`` (not encoded above chance) reads "chance"."""
    if key not in a or factor not in a[key]:
        return "-"
    return "chance" if a[key][factor] is None else str(a[key][factor])


def _nmi(nmi, interval, l, k) -> str:
    """Layer ``l``'s best-dim normalised information about factor ``k``, with its bootstrap interval if any."""
    if nmi[l][k] is None:
        return "-"
    if not interval or interval["low"][l][k] is None:
        return f"{float(nmi[l][k]):.2f}"
    return f"{float(nmi[l][k]):.2f} [{float(interval['low'][l][k]):.2f}, {float(interval['high'][l][k]):.2f}]"


def report(root, tags) -> str:
    from pyro_vlae.evaluation.assignment import RULE

    lines, folders = ["### C5 pilot: per run\n", RULE], []
    for tag in tags:
        path = os.path.join(root, tag, "eval.json")
        if not _evaluated(os.path.join(root, tag)):
            lines.append(f"\n#### {tag}: not evaluated\n")
            continue
        with open(path) as fh:
            lines += run_summary(tag, json.load(fh))
        folders.append((tag, os.path.join(root, tag)))
    for key in ("mi_mass", "importance_share", "best_unit_nmi"):
        lines.append(share_tables(folders, key))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/c5_pilot")
    p.add_argument("--steps", type=int, default=2000, help="steps of 100 images per run (default 2000: 0.43 epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each (default 2)")
    p.add_argument("--budget-minutes", type=float, default=150.0, help="stop launching new work after this long")
    p.add_argument("--phase", choices=["all", "train", "evaluate", "report"], default="all")
    p.add_argument("--runs", nargs="+", metavar="TAG", help="only these runs (default: every layout)")
    p.add_argument("--c4-layout", default="5,5,5,10", help="layer sizes of the C4 runs c4-hvae and c4-vae-beta4")
    args = p.parse_args(argv)
    table = {**LAYOUTS, **c4_runs(args.c4_layout)}
    tags = args.runs or list(LAYOUTS)
    unknown = sorted(set(tags) - set(table))
    if unknown:
        p.error(f"unknown run tag(s) {unknown}; choose from {sorted(table)}")
    os.makedirs(args.root, exist_ok=True)
    deadline = time.time() + 60 * args.budget_minutes
    if args.phase in ("all", "train"):
        jobs = [
            (tag, train_cmd(args.root, tag, *table[tag], args.steps, args.seed), os.path.join(args.root, f"{tag}.log"))
            for tag in tags
            if not _done(os.path.join(args.root, tag), args.steps)
        ]
        run_pool(jobs, args.jobs, deadline)
    if args.phase in ("all", "evaluate"):
        jobs = [
            (tag, eval_cmd(args.root, tag), os.path.join(args.root, f"{tag}.eval.log"))
            for tag in tags
            if _done(os.path.join(args.root, tag), args.steps) and not _evaluated(os.path.join(args.root, tag))
        ]
        run_pool(jobs, args.jobs, deadline)
    if args.phase in ("all", "report"):
        print(report(args.root, tags))


if __name__ == "__main__":
    main()
