"""Regenerate the shipped weights from a trained run: ``python -m pyro_vlae.pretrained.export RUN_DIR``.

The shipped ``vlae-mnist`` is the default job on CPU; to rebuild it (about 6 minutes on 2 cores, 8 the first time,
when the digit classifier is trained and cached)::

    python -m pyro_vlae.run --model vlae --device cpu --run-dir runs/vlae-mnist-pretrained
    python -m pyro_vlae.pretrained.export runs/vlae-mnist-pretrained

This writes ``vlae-mnist.pt``/``.json`` and ``mnist-classifier.pt``/``.json`` into ``pyro_vlae/pretrained/`` (or
``--out``).  The large weight matrices (:data:`HALF_MIN_NUMEL` entries or more: almost all of the bytes) are stored
in half precision, and only when that changes the decoded means by at most one grey level of an 8-bit image
(:data:`HALF_TOLERANCE`) and leaves the classifier's test predictions all but unchanged; biases, batch-norm
parameters and statistics and the small heads stay float32 (in half they moved the outputs several times more).
The measured differences go into the provenance file.

Provenance must name code that reproduces the weights: the export refuses a checkout with uncommitted changes to
tracked files (other than the files it writes), and a run said to be trained on a changed tree (``--dirty``), unless
``--allow-dirty`` is given; then the SHA-256 of the changes (``git diff --binary HEAD`` of the changed files) is
recorded beside their names (:mod:`.provenance`).  The ``.json`` says which commit trained the run (``--commit``,
default the exporting checkout's HEAD) and which commit exported it.

A run stopped before its ``--num-steps`` (a time limit, or the GPU driver's deadline) is refused unless
``--allow-partial`` is given, with a ``--description`` of its own; the ``.json`` then records the step reached
(``trained_steps`` and ``partial``) beside ``planned_steps``.  A run returned by the GPU driver, for example::

    python benchmarks/gpu/model_pack.py unpack FOLDER --dest runs/paper_scale
    python -m pyro_vlae.pretrained.export runs/paper_scale/shapes3d_vlae --name vlae-shapes3d --no-classifier \
        --allow-partial --description "shapes3d VLAE, 32x32, stopped by the GPU driver" --commit COMMIT

(its float16 weights pass through the same half-precision check; they were float16 already).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys

import torch

from ..data import DatasetError, load_data
from ..evaluation.classifier import SmallCNN, get_classifier, predict
from ..training.annealing import ladder_gains
from ..training.checkpoint import CheckpointError, atomic_write_bytes, atomic_write_json, read_json_dict
from ..training.runs import load_run
from . import FOLDER, FORMAT, spec_of
from .provenance import is_default_job, provenance, public_command, run_dir_of

#: Largest change of a decoded mean pixel (values in [0, 1]) that half precision may cause: one 8-bit grey level.
HALF_TOLERANCE = 1.0 / 255.0
#: Largest share of test images whose predicted class may change when the classifier is stored in half precision.
HALF_CLASS_TOLERANCE = 1e-3
#: Floating tensors with at least this many entries are stored in half precision; smaller ones stay float32.
HALF_MIN_NUMEL = 10000


def _half(state_dict: dict) -> dict:
    return {k: v.half() if v.is_floating_point() and v.numel() >= HALF_MIN_NUMEL else v for k, v in state_dict.items()}


def _roundtrip(module, state_dict: dict):
    """``module`` with ``state_dict`` passed through :func:`_half` and back to float32 (what a user loads)."""
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in _half(state_dict).items()})
    return module


@torch.no_grad()
def half_precision_effect(model, guide, x: torch.Tensor, num_codes: int = 1000, seed: int = 0) -> dict:
    """Max and mean absolute change of decoded means (prior codes, and reconstructions of ``x``) and of posterior
    means when the weights of ``model`` and ``guide`` go through half precision.  Both are restored afterwards."""
    g = torch.Generator().manual_seed(seed)
    dims = model.config.latent_dims
    zs = [torch.randn(num_codes, d, generator=g) for d in dims]
    saved = [(m, {k: v.clone() for k, v in m.state_dict().items()}) for m in (model, guide)]

    def outputs():
        locs = [loc for loc, _ in guide.posterior(x)]
        return {
            "prior_means": model.likelihood.mean(model.decode(zs)),
            "reconstructions": model.likelihood.mean(model.decode(locs)),
            "posterior_means": torch.cat(locs, 1),
        }

    full = outputs()
    for m, sd in saved:
        _roundtrip(m, sd)
    half = outputs()
    for m, sd in saved:
        m.load_state_dict(sd)
    effect = {}
    for k in full:
        d = (full[k] - half[k]).abs()
        effect[k] = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())}
        if k != "posterior_means":  # share of pixels whose 8-bit value (round(255 x)) changes
            effect[k]["changed_8bit"] = float(((full[k] * 255).round() != (half[k] * 255).round()).double().mean())
    return effect


def _eval_summary(run_dir: str) -> dict:
    """The headline numbers of the run's ``eval.json``: test ELBO, IWAE bound, per-layer KL, classifier numbers."""
    data = read_json_dict(os.path.join(run_dir, "eval.json"))
    ev = data.get("evaluation", {}).get("test", {})
    lik = ev.get("likelihood", {})
    out = {
        "train_seconds": data.get("train_seconds"),
        "test_elbo_20_batches": data.get("test"),
        "likelihood": {k: lik.get(k) for k in ("num_images", "num_samples", "elbo", "iwae", "iwae_bpd", "recon")},
        "kl_per_layer": {s: v.get("kl") for s, v in ev.get("latents", {}).items()},
        "active_units": {s: v.get("active_units") for s, v in ev.get("latents", {}).items()},
        "probe_accuracy": {s: p.get("test_accuracy") for s, p in ev.get("probes", {}).items()},
        "sample_quality": ev.get("sample_quality"),
        "classifier_test_accuracy": ev.get("classifier", {}).get("test_accuracy"),
    }
    layers = data.get("layers", {})
    if isinstance(layers.get("layers"), dict):  # per-layer interventions: class-change rate and variance share
        keys = ("class_change_rate", "variance_share")
        out["interventions"] = {s: {k: v.get(k) for k in keys} for s, v in layers["layers"].items()}
        out["interventions"]["independent_samples_class_change_rate"] = layers.get("baseline_class_change_rate")
    chains = data.get("gibbs", {}).get("chains", {})
    keys = ("keep", "start_class_kept_rate", "class_switch_rate", "max_rhat")
    out["gibbs"] = {name: {k: c.get(k) for k in keys} for name, c in chains.items() if isinstance(c, dict)}
    return out


def _write(out: str, name: str, state: dict, meta: dict) -> str:
    """Write ``<name>.pt`` (``state`` with the architecture of ``meta`` as its ``spec``, so the hash covers it) and
    ``<name>.json`` (``meta`` with the ``.pt``'s SHA-256, size and format)."""
    state = {**state, "spec": spec_of(meta), "format": FORMAT}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    meta = {**meta, "format": FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    atomic_write_bytes(os.path.join(out, name + ".pt"), data)
    atomic_write_json(os.path.join(out, name + ".json"), meta)
    return os.path.join(out, name + ".pt")


#: What the provenance of a run exported before its ``--num-steps`` says about the step reached.
PARTIAL_NOTE = (
    "stopped before its --num-steps (a time limit or a driver's stop), exported with --allow-partial: the command "
    "trains to num_steps, these weights are those of the step reached"
)


def describe(config, command: list, step: int) -> str:
    """The default description of an exported run: its model, dataset, preset and length; the default job by name."""
    head = f"{config.model_kind} on {config.dataset}, preset {config.preset}"
    if is_default_job(command) and config.preset == "mnist-cpu":
        return head + ": the default job on CPU"
    return f"{head}, {step} steps of batch {config.train.batch_size}"


def export_model(
    run_dir: str,
    out: str,
    name: str,
    commit: dict,
    x_check: torch.Tensor,
    log=print,
    allow_partial: bool = False,
    description: str | None = None,
) -> str:
    """Write ``<out>/<name>.pt`` and ``.json`` from the run in ``run_dir``.

    :param allow_partial: export a run stopped before its ``--num-steps`` (as the GPU driver stops its runs at a
        deadline); the provenance records the step reached (``trained_steps``, ``partial``) beside the planned
        ``planned_steps``.  Such a run needs its own ``description``.
    :param description: the entry's one-line description (default: from the run's settings, :func:`describe`).
    :raises ValueError: for a stopped run without ``allow_partial``, or with it but without a description.
    """
    model, guide, config, state = load_run(run_dir, "cpu")
    tc, L, step = config.train, config.model.num_layers, int(state["step"])
    partial = step < tc.num_steps
    if partial and not allow_partial:
        raise ValueError(
            f"{run_dir} stopped at step {step} of {tc.num_steps}: finish it with python -m pyro_vlae.run --resume "
            f"{run_dir}, or export the step reached with --allow-partial and a --description saying how it was "
            "trained and stopped"
        )
    if partial and not description:
        raise ValueError(
            f"--allow-partial needs --description: {run_dir} stopped at step {step} of {tc.num_steps}, so say how "
            'it was trained and stopped, e.g. --description "shapes3d VLAE, 32x32, stopped by the GPU driver"'
        )
    gain = None
    if config.model_kind == "vlae":  # the gains of the last step trained (all 1 once the fade-in is over)
        saved = state["model"].get("ladder_gain")
        last = ladder_gains(max(step - 1, 0), L, tc.fade_in)
        gain = (saved if saved is not None else torch.tensor(last)).detach().float().cpu().clone()
        model.ladder_gain.copy_(gain)
    effect = half_precision_effect(model, guide, x_check.float())
    worst = max(effect["prior_means"]["max_abs_diff"], effect["reconstructions"]["max_abs_diff"])
    half = worst <= HALF_TOLERANCE
    log(f"{name}: half precision changes decoded means by at most {worst:.2e} ({'stored' if half else 'float32 kept'})")
    conv = _half if half else dict
    model_sd = {k: v for k, v in model.state_dict().items() if k != "ladder_gain"}
    weights = {"model": conv(model_sd), "guide": conv(guide.state_dict())}
    if gain is not None:
        weights["ladder_gain"] = gain
    argv = read_json_dict(os.path.join(run_dir, "config.json")).get("command") or []
    command = public_command(argv)
    folder = run_dir_of(command, "runs/" + os.path.basename(os.path.normpath(run_dir)))
    export = f"python -m pyro_vlae.pretrained.export {folder}"
    meta = {
        "kind": "model",
        "name": name,
        "description": description or describe(config, argv, step),
        "command": command,
        **commit,
        "trained_steps": step,
        "planned_steps": tc.num_steps,
        "partial": {"step": step, "num_steps": tc.num_steps, "note": PARTIAL_NOTE} if partial else None,
        "ladder_gain": gain.tolist() if gain is not None else None,
        "dtype": f"float16 for tensors of >= {HALF_MIN_NUMEL} entries, else float32" if half else "float32",
        "half_precision_effect": effect,
        "half_tolerance": HALF_TOLERANCE,
        "config": config.to_dict(),
        "evaluation": _eval_summary(run_dir),
        "regenerate": f"{command} && {export}" + (" --allow-partial --description ..." if partial else ""),
    }
    return _write(out, name, weights, meta)


def export_classifier(bundle, cache_dir: str, out: str, name: str, commit: dict, log=print) -> str:
    """Write ``<out>/<name>.pt`` and ``.json``: the evaluation's cached digit classifier (trained if not cached)."""
    x_train, y_train = bundle.tensors("train")
    x_test, y_test = bundle.tensors("test")
    clf, cinfo = get_classifier(
        x_train, y_train, num_classes=bundle.num_classes, cache_dir=cache_dir, x_test=x_test, y_test=y_test, log=log
    )
    sd = clf.state_dict()
    full = predict(clf, x_test)
    half_clf = _roundtrip(SmallCNN(clf.in_channels, clf.num_classes, clf.feature_dim), sd)
    pred = predict(half_clf, x_test)
    changed = float((pred != full).double().mean())
    half = changed <= HALF_CLASS_TOLERANCE
    acc = float((pred if half else full).eq(y_test.long()).double().mean())
    log(f"{name}: test accuracy {acc:.4f}; half precision changes {changed:.2e} of the test predictions")
    meta = {
        "kind": "classifier",
        "name": name,
        "description": "SmallCNN digit classifier on the 60k MNIST training images (pyro_vlae.evaluation.classifier)",
        **commit,
        "in_channels": clf.in_channels,
        "num_classes": clf.num_classes,
        "feature_dim": clf.feature_dim,
        "test_accuracy": acc,
        "test_accuracy_float32": cinfo["test_accuracy"],
        "half_changed_predictions": changed,
        "dtype": f"float16 for tensors of >= {HALF_MIN_NUMEL} entries, else float32" if half else "float32",
        "training_fingerprint": cinfo["fingerprint"],
    }
    return _write(out, name, {"classifier": _half(sd) if half else sd}, meta)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pyro_vlae.pretrained.export",
        description="Export a finished MNIST run and the evaluation's digit classifier as shipped pretrained weights.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (checkpoints/latest.pt, eval.json)")
    p.add_argument("--name", default="vlae-mnist", help="entry name of the model (default: vlae-mnist)")
    p.add_argument("--classifier-name", default="mnist-classifier", help="entry name of the classifier")
    p.add_argument("--out", default=FOLDER, help="output folder (default: the installed pyro_vlae/pretrained/)")
    p.add_argument("--commit", help="commit the run was trained at (default: HEAD of the exporting checkout)")
    p.add_argument("--dirty", help="with --commit: comma-separated tracked files that differed from it at training")
    p.add_argument(
        "--allow-dirty",
        action="store_true",
        help="export from a checkout with uncommitted changes (or a run trained with some, --dirty); the changed "
        "files and the SHA-256 of their diff are recorded",
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="export a run stopped before its --num-steps (e.g. by the GPU driver's deadline); the step reached is "
        "recorded (trained_steps, partial) and --description is required",
    )
    p.add_argument("--description", help="the model entry's one-line description (default: from the run's settings)")
    p.add_argument("--note", help="a line of provenance to keep in the .json files")
    p.add_argument("--no-classifier", action="store_true", help="export the model only")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is not a folder; create it first")
        commit = provenance(args)
        if args.note:
            commit["note"] = args.note
        config = read_json_dict(os.path.join(args.run_dir, "config.json"))
        if not config:
            raise CheckpointError(f"{args.run_dir} has no readable config.json; is it a run folder?")
        bundle = load_data(config["dataset"], config.get("data_dir", "data"), 100, seed=int(config.get("seed", 0)))
        x_check = bundle.tensors("test")[0][:1000]
        print(
            export_model(
                args.run_dir,
                args.out,
                args.name,
                commit,
                x_check,
                allow_partial=args.allow_partial,
                description=args.description,
            )
        )
        if not args.no_classifier:
            cache = os.path.join(config.get("data_dir", "data"), "classifiers")
            print(export_classifier(bundle, cache, args.out, args.classifier_name, commit))
    except (CheckpointError, DatasetError, ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
