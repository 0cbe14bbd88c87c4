"""Command line: ``python -m pyro_vlae.run --model vlae`` trains a model and writes a run folder.

Examples::

    python -m pyro_vlae.run --model vlae                      # full MNIST, CPU-sized preset on CPU (~12 min)
    python -m pyro_vlae.run --model hvae --num-steps 6000     # the stacked HVAE of matched capacity
    python -m pyro_vlae.run --resume runs/vlae_mnist_seed0_...  # continue a run exactly where it stopped
    python -m pyro_vlae.run --visualize-only runs/vlae_mnist_seed0_...
    torchrun --nproc-per-node 4 -m pyro_vlae.run --model vlae  # data-parallel: 4 processes of --batch-size each

``main(argv)`` is callable from Python and returns the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

import torch

from . import distributed as D
from . import presets as P
from .annealing import SCHEDULE_HELP, KLSchedule
from .checkpoint import CheckpointError, RunLock, RunLockedError, load_checkpoint, update_json
from .data import DATASETS, DatasetError, load_data
from .figures import write_figures
from .guides import GUIDES
from .nets import LIKELIHOODS
from .train import (
    RunConfig,
    TrainingDiverged,
    build,
    evaluate_elbo,
    fit,
    load_run,
    resolve_device,
    truncate_metrics,
    write_config,
)


def _int_at_least(lowest: int, what: str):
    """An argparse type: an integer >= ``lowest``."""

    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lowest:
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, ">= 0")


def _device(text):
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:<index>") from None
    return text


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def _latent_dims(text):
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of sizes, e.g. 16,2,2") from None
    if min(dims) < 1:
        raise argparse.ArgumentTypeError(f"every latent size must be >= 1, got {text}")
    return dims


def _schedule(text):
    try:
        KLSchedule(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pyro_vlae.run",
        description="Train a VLAE, stacked HVAE or VAE with Pyro SVI and write a run folder "
        "(config.json, metrics.jsonl, checkpoints/, figures/, eval.json).",
    )
    # --model and --dataset default to None so that a resume can tell a flag given as "vlae" from no flag.
    p.add_argument("--model", choices=sorted(GUIDES), help="model/guide pair (default: vlae)")
    p.add_argument("--dataset", choices=DATASETS, help="dataset (default: mnist)")
    p.add_argument("--preset", choices=sorted(P.PRESETS), help="architecture preset (default: by dataset and device)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--num-steps", type=_positive_int, help="SVI steps (default: the preset's)")
    steps.add_argument("--epochs", type=_positive_int, help="passes over the training set instead of --num-steps")
    p.add_argument("--batch-size", type=_positive_int, help="images per step (default: the preset's, 100)")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate (default: the preset's)")
    p.add_argument("--likelihood", choices=LIKELIHOODS, help="observation model r(x) (default: the preset's)")
    p.add_argument(
        "--latent-dims",
        type=_latent_dims,
        metavar="D1,D2,...",
        help="sizes of z1 (bottom) .. zL, which also sets the number of layers (default: the preset's)",
    )
    p.add_argument("--obs-scale", type=_positive_float, help="Gaussian sigma or Laplace scale b = 1/loss_ratio")
    p.add_argument("--anneal", type=_schedule, help=f"KL-scale schedule: {SCHEDULE_HELP}")
    p.add_argument("--elbo", choices=["trace", "meanfield"], help="Trace_ELBO (default) or TraceMeanField_ELBO")
    p.add_argument("--beta", type=_positive_float, help="KL weight of the flat VAE (beta-VAE); default 1")
    p.add_argument("--noise-injection", choices=["concat", "gated_add"], help="VLAE ladder combination")
    p.add_argument(
        "--fade-in", type=int, help="VLAE: steps per layer of a progressive fade-in of lower layers (0: off)"
    )
    p.add_argument("--device", type=_device, default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--seed", type=_nonnegative_int, default=0)
    p.add_argument("--data-dir", default="data", help="where datasets are looked for (default: ./data)")
    p.add_argument("--sprites-size", type=int, choices=[32, 64], help="sprites image size (default: from preset)")
    p.add_argument("--run-dir", help="run folder (default: runs/<model>_<dataset>_seed<k>_<time>)")
    p.add_argument("--runs-root", default="runs", help="parent of new run folders (default: ./runs)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/latest.pt")
    p.add_argument("--force-config", action="store_true", help="resume even if flags differ from the saved config")
    p.add_argument("--visualize-only", metavar="RUN_DIR", help="only (re)write the figures of a trained run")
    p.add_argument("--log-every", type=_positive_int, help="steps between metrics.jsonl lines")
    p.add_argument("--checkpoint-every", type=_positive_int, help="steps between checkpoints")
    p.add_argument("--keep-every", type=_nonnegative_int, help="also keep checkpoints/step<k>.pt every this many steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--sync-batch-norm",
        action="store_true",
        help="under torchrun: batch-norm statistics of the global batch instead of each process's own",
    )
    p.add_argument("--no-figures", action="store_true", help="skip writing figures at the end")
    p.add_argument(
        "--validate-all-steps",
        action="store_true",
        help="keep Pyro's validation on for every step (default: the first 10 of each start, then off for speed)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation (IWAE, classifier, report) at the end")
    p.add_argument(
        "--eval-samples",
        type=_positive_int,
        default=10,
        help="importance samples K of the end-of-run "
        "evaluation (python -m pyro_vlae.evaluate RUN_DIR --num-samples 1000 for a tight bound)",
    )
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    return p


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _overrides(args) -> tuple:
    """``(model, train)``: the settings given on the command line, as dicts of the config fields they replace."""
    model_over = {
        k: v
        for k, v in {
            "likelihood": args.likelihood,
            "latent_dims": args.latent_dims,
            "obs_scale": args.obs_scale,
            "beta": args.beta,
            "noise_injection": args.noise_injection,
        }.items()
        if v is not None
    }
    train_over = {
        k: v
        for k, v in {
            "num_steps": args.num_steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "anneal": args.anneal,
            "elbo": args.elbo,
            "log_every": args.log_every,
            "checkpoint_every": args.checkpoint_every,
            "fade_in": args.fade_in,
            "keep_every": args.keep_every,
        }.items()
        if v is not None
    }
    return model_over, train_over


def _config_from_args(args, image_shape, cuda: bool) -> RunConfig:
    preset = P.get_preset(args.preset or P.default_preset_name(args.dataset, cuda))
    model_over, train_over = _overrides(args)
    model = dataclasses.replace(preset.model, **model_over)
    train = dataclasses.replace(preset.train, **train_over)
    P.check_image_shape(model, image_shape, args.dataset)
    return RunConfig(args.model, args.dataset, preset.name, model, train, args.seed, args.data_dir)


def _forced_config(args, saved: RunConfig, cuda: bool) -> RunConfig:
    """``--force-config``: the saved run with only the flags given on the command line changed."""
    model_over, train_over = _overrides(args)
    dataset = args.dataset or saved.dataset
    preset = args.preset or (saved.preset if dataset == saved.dataset else P.default_preset_name(dataset, cuda))
    model = saved.model if preset == saved.preset else P.get_preset(preset).model
    return RunConfig(
        args.model or saved.model_kind,
        dataset,
        preset,
        dataclasses.replace(model, **model_over),
        dataclasses.replace(saved.train, **train_over),
        saved.seed,
        saved.data_dir,
        dict(saved.extra),
    )


def _check_weights_fit(config: RunConfig, state: dict) -> None:
    """Refuse a forced configuration whose networks cannot take the checkpoint's weights."""
    model, guide, _, _ = build(config, "cpu")
    try:
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
    except RuntimeError as e:
        why = " ".join(str(e).split())[:200]
        raise CheckpointError(
            f"the checkpoint's weights do not fit a {config.model_kind} model with preset {config.preset} ({why}); "
            "--force-config can change training settings, not the architecture: start a new run instead"
        ) from None


def _resume_conflicts(args, saved: RunConfig) -> list:
    """Flags given on the command line that contradict the saved run (model, dataset, preset, architecture)."""
    out = []
    for flag, saved_value in (("model", saved.model_kind), ("dataset", saved.dataset), ("preset", saved.preset)):
        value = getattr(args, flag)
        if value is not None and value != saved_value:
            out.append(f"--{flag} {value} (the run has {saved_value})")
    for flag in ("likelihood", "latent_dims", "obs_scale", "beta", "noise_injection"):
        value = getattr(args, flag)
        if value is not None and value != getattr(saved.model, flag):
            out.append(f"--{flag.replace('_', '-')} {value} (the run has {getattr(saved.model, flag)})")
    for flag in ("batch_size", "lr", "anneal", "elbo"):
        value = getattr(args, flag)
        if value is not None and value != getattr(saved.train, flag):
            out.append(f"--{flag.replace('_', '-')} {value} (the run has {getattr(saved.train, flag)})")
    return out


def _data(config: RunConfig, args):
    size = getattr(args, "sprites_size", None) or (config.model.image_shape[-1] if config.dataset == "sprites" else 64)
    return load_data(config.dataset, config.data_dir, config.train.batch_size, seed=config.seed, sprites_size=size)


def _test_images(bundle, n=64):
    t = bundle.tensors("test")
    if t is not None:
        return t[0][:n]
    return torch.stack([bundle.test[i][0] for i in range(min(n, len(bundle.test)))])


def _check_writable(run_dir: str):
    try:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        probe = os.path.join(run_dir, ".write_probe")
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(probe)
    except OSError as e:
        raise OSError(
            f"cannot write to the run folder {run_dir} ({e.strerror or e}); choose a writable --run-dir "
            "or free some disk space"
        ) from None


def visualize(run_dir: str, device="cpu", log=print) -> list:
    model, guide, config, _ = load_run(run_dir, device)
    bundle = load_data(
        config.dataset,
        config.data_dir,
        16,
        seed=config.seed,
        sprites_size=config.model.image_shape[-1] if config.dataset == "sprites" else 64,
    )
    return write_figures(run_dir, model, guide, config, _test_images(bundle).to(device), log=log)


def main(argv=None) -> int:
    """Run the command line with ``argv`` (a list of strings, default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        for name, preset in sorted(P.PRESETS.items()):
            print(f"{name:12s} {preset.model.image_shape}  {preset.description}")
        return 0
    try:
        par, device = D.join(resolve_device(args.device))  # under torchrun: this rank's process group and device
        if args.visualize_only:
            if par.is_lead:
                paths = visualize(args.visualize_only, device)
                print("figures written:\n  " + "\n  ".join(paths))
            return 0
        resume = None
        if args.resume:
            resume = load_checkpoint(os.path.join(args.resume, "checkpoints", "latest.pt"))
            config = RunConfig.from_dict(resume["config"])
            conflicts = _resume_conflicts(args, config)
            if conflicts and not args.force_config:
                return _fail(
                    f"refusing to resume {args.resume}: {'; '.join(conflicts)}. Drop those flags, or pass "
                    "--force-config to override the saved configuration"
                )
            if conflicts:
                config = _forced_config(args, config, device.type == "cuda")
                _check_weights_fit(config, resume)
            if args.num_steps:
                config.train.num_steps = args.num_steps
            run_dir = args.resume
        else:
            args.model, args.dataset = args.model or "vlae", args.dataset or "mnist"
            bundle_probe = None
            cuda = device.type == "cuda"
            preset_name = args.preset or P.default_preset_name(args.dataset, cuda)
            batch = args.batch_size or P.get_preset(preset_name).train.batch_size
            bundle_probe = load_data(
                args.dataset,
                args.data_dir,
                batch,
                seed=args.seed,
                sprites_size=args.sprites_size or P.get_preset(preset_name).model.image_shape[-1]
                if args.dataset == "sprites"
                else 64,
            )
            config = _config_from_args(args, bundle_probe.image_shape, cuda)
            if args.epochs:
                config.train.num_steps = args.epochs * (
                    len(bundle_probe.train) // (config.train.batch_size * par.world_size)
                )
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = par.broadcast(
                args.run_dir or os.path.join(args.runs_root, f"{args.model}_{args.dataset}_seed{args.seed}_{stamp}")
            )
        if not args.resume and os.path.exists(os.path.join(run_dir, "checkpoints", "latest.pt")):
            return _fail(
                f"{run_dir} already holds a run; continue it with --resume {run_dir}, or choose another --run-dir"
            )
        D.note_in_config(config, par, args.sync_batch_norm, resuming=bool(args.resume))
        if par.is_lead:  # only rank 0 writes
            _check_writable(run_dir)
        with RunLock(run_dir) if par.is_lead else contextlib.nullcontext():
            bundle = bundle_probe if not args.resume else _data(config, args)
            if args.resume:  # a forced change of dataset must still match the network
                P.check_image_shape(config.model, bundle.image_shape, config.dataset)
            if args.resume and par.is_lead:
                truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), int(resume["step"]))
            if par.is_lead:
                argv_ = sys.argv if argv is None else ["python", "-m", "pyro_vlae.run", *argv]
                write_config(run_dir, config, argv=argv_)
                print(
                    f"run folder: {run_dir}\ndata: {bundle.name} from {bundle.source}, {len(bundle.train)} train / "
                    f"{len(bundle.test)} test images of shape {bundle.image_shape}\nmodel: {config.model_kind}, "
                    f"preset {config.preset}, device {device}, {config.train.num_steps} steps of batch "
                    f"{config.train.batch_size}" + (f" x {par.world_size} processes" if par.world_size > 1 else "")
                )
            result = fit(
                config,
                bundle,
                run_dir,
                device,
                resume=resume,
                progress=not args.no_progress,
                validate_all=args.validate_all_steps,
            )
            if result.interrupted:
                return 130
            return _finish(run_dir, config, bundle, result, device, args) if par.is_lead else 0
    except (DatasetError, CheckpointError, RunLockedError, TrainingDiverged, ValueError, OSError) as e:
        return _fail(str(e), 1 if isinstance(e, TrainingDiverged) else 2)
    finally:
        D.leave()


def _finish(run_dir, config, bundle, result, device, args) -> int:
    """After training: test ELBO, figures, then the evaluation (IWAE, classifier, interventions, Gibbs, report)."""
    model, guide, config, _ = load_run(run_dir, device)
    gen = torch.Generator().manual_seed(config.seed)
    bern = config.model.likelihood == "bernoulli"  # score one fixed binarisation, as the model was trained on draws
    batches = ((torch.bernoulli(x, generator=gen) if bern else x).to(device) for x, _ in bundle.test_loader)
    test = evaluate_elbo(model, guide, batches, max_batches=20)
    summary = {"step": result.step, "train_seconds": result.seconds, "test": test}
    update_json(os.path.join(run_dir, "eval.json"), summary)
    line = ", ".join(f"{k} {v:.3f}" for k, v in test.items() if k != "num_images")
    print(
        f"trained {result.step} steps in {result.seconds / 60:.1f} min; test ({test.get('num_images', 0)} images): "
        f"{line}"
    )
    if not args.no_figures:
        paths = write_figures(run_dir, model, guide, config, _test_images(bundle).to(device))
        print("figures written:\n  " + "\n  ".join(paths))
    if not args.no_eval:
        from .evaluate import evaluate_run

        evaluate_run(
            run_dir,
            num_samples=args.eval_samples,
            max_images=1000,
            device=str(device),
            log=lambda msg: print(msg, flush=True),
        )
        print(f"evaluation: {os.path.join(run_dir, 'eval.json')} and {os.path.join(run_dir, 'report.md')}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
