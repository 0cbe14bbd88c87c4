"""Command line: ``python -m pyro_vlae.run --model vlae`` trains a model and writes a run folder.

Examples::

    python -m pyro_vlae.run --model vlae                      # full MNIST, CPU-sized preset on CPU (~6 min)
    python -m pyro_vlae.run --model hvae --num-steps 6000     # the stacked HVAE of matched capacity
    python -m pyro_vlae.run --resume runs/vlae_mnist_seed0_...  # continue a run exactly where it stopped
    python -m pyro_vlae.run --visualize-only runs/vlae_mnist_seed0_...
    torchrun --nproc-per-node 4 -m pyro_vlae.run --model vlae  # data-parallel: 4 processes of --batch-size each

``main(argv)`` is callable from Python and returns the exit code.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

from . import presets as P
from .cli_config import (
    apply_schedule_flags,
    build_parser,
    check_flags,
    check_weights_fit,
    config_from_args,
    forced_config,
    resume_conflicts,
    saved_config,
)
from .data import DatasetError, load_data
from .figures import scored_gibbs_figure, write_figures
from .training import distributed as D
from .training.checkpoint import (
    CheckpointError,
    RunLock,
    RunLockedError,
    load_checkpoint,
    read_json_dict,
    update_json,
)
from .training.loop import TrainingDiverged, evaluate_elbo, fit
from .training.progress import truncate_metrics
from .training.runs import (
    RunConfig,
    check_objective,
    check_run_identity,
    load_run,
    new_run_id,
    resolve_device,
    write_config,
)


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _data(config: RunConfig, args):
    size = getattr(args, "sprites_size", None) or (config.model.image_shape[-1] if config.dataset == "sprites" else 64)
    shapes3d_size = config.model.image_shape[-1] if config.dataset == "shapes3d" else 64
    return load_data(
        config.dataset,
        config.data_dir,
        config.train.batch_size,
        seed=config.seed,
        sprites_size=size,
        shapes3d_size=shapes3d_size,
    )


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
        shapes3d_size=config.model.image_shape[-1] if config.dataset == "shapes3d" else 64,
    )
    return write_figures(run_dir, model, guide, config, _test_images(bundle).to(device), log=log)


def resumed_config(args, resume: dict, cuda: bool) -> RunConfig:
    """The config to continue the run ``args.resume`` with, from its loaded checkpoint ``resume``: refused (before any
    data is read or file written) when the checkpoint is a float16 copy that cannot resume, when it belongs to another
    run, when flags contradict the saved run without ``--force-config``, or when the result is not a valid objective.

    :raises ValueError: naming the problem and the fix.
    """
    if resume.get("resumable") is False:  # benchmarks/gpu/model_pack.py's float16 copy: no optimiser or RNG state
        raise ValueError(
            f"refusing to resume {args.resume}: its checkpoint is a float16 copy for evaluation and export (no "
            "optimiser or RNG state), so it cannot be resumed; start a new run from its weights, or resume the "
            "original run folder"
        )
    config = saved_config(resume)
    check_run_identity(args.resume, config)
    conflicts = resume_conflicts(args, config)
    if conflicts and not args.force_config:
        raise ValueError(
            f"refusing to resume {args.resume}: {'; '.join(conflicts)}. Drop those flags, or pass "
            "--force-config to override the saved configuration"
        )
    if conflicts:
        config = forced_config(args, config, cuda)
        check_weights_fit(config, resume)
    apply_schedule_flags(args, config)
    try:
        check_objective(config)
    except ValueError as e:
        raise ValueError(
            f"cannot resume {args.resume}: {e}, and pass --force-config to change the saved setting"
        ) from None
    return config


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
            run_dir = args.resume
            latest = os.path.join(run_dir, "checkpoints", "latest.pt")
            if not os.path.isfile(latest):
                load_checkpoint(latest)  # raises the error that says there is no checkpoint, before anything is written
        else:
            args.model, args.dataset = args.model or "vlae", args.dataset or "mnist"
            check_flags(args.model, args)  # before any data is read
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
                shapes3d_size=P.get_preset(preset_name).model.image_shape[-1] if args.dataset == "shapes3d" else 64,
            )
            config = config_from_args(args, bundle_probe.image_shape, cuda)
            config.run_id = par.broadcast(config.run_id)  # rank 0's, as for the run folder
            if args.epochs:
                config.train.num_steps = args.epochs * (
                    len(bundle_probe.train) // (config.train.batch_size * par.world_size)
                )
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = par.broadcast(
                args.run_dir or os.path.join(args.runs_root, f"{args.model}_{args.dataset}_seed{args.seed}_{stamp}")
            )
            if os.path.exists(os.path.join(run_dir, "checkpoints", "latest.pt")):
                return _fail(
                    f"{run_dir} already holds a run; continue it with --resume {run_dir}, or choose another --run-dir"
                )
        if par.is_lead:  # only rank 0 writes
            _check_writable(run_dir)
        with RunLock(run_dir) if par.is_lead else contextlib.nullcontext():
            if args.resume:  # read under the lock: no other process is writing it, and nothing is written until it fits
                resume = load_checkpoint(os.path.join(run_dir, "checkpoints", "latest.pt"))
                config = resumed_config(args, resume, device.type == "cuda")
            D.note_in_config(config, par, args.sync_batch_norm, resuming=bool(args.resume))
            bundle = bundle_probe if not args.resume else _data(config, args)
            if args.resume:  # a forced change of dataset must still match the network
                P.check_image_shape(config.model, bundle.image_shape, config.dataset)
            if args.resume and par.is_lead:
                truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), int(resume["step"]))
            adopted = None  # a run saved before run ids gets its identity now (every rank, the same); config.json
            if not config.run_id:  # records its id-less checkpoint's settings, which a forced resume may have changed
                config.run_id = par.broadcast(new_run_id())
                adopted = RunConfig.from_dict(resume["config"]) if resume else None
            if par.is_lead:
                argv_ = sys.argv if argv is None else ["python", "-m", "pyro_vlae.run", *argv]
                write_config(run_dir, config, argv=argv_, adopted_from=adopted)
                print(
                    f"run folder: {run_dir}\ndata: {bundle.name} from {bundle.source}, {len(bundle.train)} train / "
                    f"{len(bundle.test)} test images of shape {bundle.image_shape}\nmodel: {config.model_kind}, "
                    f"preset {config.preset}, device {device}, {config.train.num_steps} steps of batch "
                    f"{config.train.batch_size}" + (f" x {par.world_size} processes" if par.world_size > 1 else "")
                )
                fade_end = config.model.num_layers * config.train.fade_in if config.model_kind == "vlae" else 0
                if fade_end > config.train.num_steps:
                    print(
                        f"note: the fade-in ends at step {fade_end}, after the last step {config.train.num_steps}: "
                        "the lower layers' ladder gains stay below 1, and the saved model (which evaluation and "
                        "figures use) is that partly faded-in VLAE"
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
                return 128 + int(result.stop_signal)  # 130 after Ctrl-C, 143 after SIGTERM, as a shell reports
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
    if not args.no_figures:  # with the evaluation, the Gibbs figure is scored by its classifier (distances in titles)
        paths = write_figures(run_dir, model, guide, config, _test_images(bundle).to(device), gibbs=args.no_eval)
        if not args.no_eval:
            paths.append(scored_gibbs_figure(run_dir, model, guide, config, bundle, device))
        print("figures written:\n  " + "\n  ".join(paths))
    if not args.no_eval:
        from .evaluation.pipeline import evaluate_run

        evaluate_run(
            run_dir,
            num_samples=args.eval_samples,
            max_images=1000,
            dci_estimator=args.eval_dci,
            device=str(device),
            log=lambda msg: print(msg, flush=True),
        )
        print(f"evaluation: {os.path.join(run_dir, 'eval.json')} and {os.path.join(run_dir, 'report.md')}")
        from .evaluation.diagnostics import collapse_summary

        summary = collapse_summary(read_json_dict(os.path.join(run_dir, "eval.json")).get("gibbs"))
        if summary:  # a collapsed chain is said so in words, never left to read as converged
            print(summary)
    print(f"checkpoint: {result.checkpoint}")
    return 0


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
