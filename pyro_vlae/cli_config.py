"""The command line's flags and how they become a :class:`~pyro_vlae.training.runs.RunConfig`.

``build_parser`` declares the flags of ``python -m pyro_vlae.run``; ``config_from_args`` turns them into a new run's
config, with a new run id; on ``--resume``, ``resume_conflicts`` lists the flags that contradict the saved run,
``forced_config`` applies only the flags given over it (``--force-config``), ``check_weights_fit`` refuses a config
whose weights would not fit the checkpoint before anything is written, and ``apply_schedule_flags`` takes the flags
that change when to stop, log and checkpoint, which need no force.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from . import presets as P
from .data import DATASETS
from .guides import GUIDES
from .nets import LIKELIHOODS
from .training.annealing import SCHEDULE_HELP, KLSchedule
from .training.checkpoint import CheckpointError
from .training.runs import (
    MEANFIELD_MODELS,
    RunConfig,
    build,
    check_settings,
    load_weights,
    new_run_id,
    resolve_device,
)
from .training.step import CUDA_GRAPH_MODES, PRECISIONS, use_cuda_graph


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


def _float_where(ok, what: str):
    """An argparse type: a number for which ``ok`` holds, described by ``what``."""

    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return v

    return parse


_positive_float = _float_where(lambda v: v > 0, "> 0")
_nonnegative_float = _float_where(lambda v: 0 <= v < math.inf, ">= 0 and finite")


def _latent_dims(text):
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of sizes, e.g. 16,2,2") from None
    if min(dims) < 1:
        raise argparse.ArgumentTypeError(f"every latent size must be >= 1, got {text}")
    return dims


def _on_off(text):
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


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
        help="sizes of z1 (bottom) .. zL, which also sets the number of layers; the flat vae gets one code of their "
        "total size (default: the preset's)",
    )
    p.add_argument("--obs-scale", type=_positive_float, help="Gaussian sigma or Laplace scale b = 1/loss_ratio")
    p.add_argument("--anneal", type=_schedule, help=f"KL-scale schedule: {SCHEDULE_HELP}")
    p.add_argument(
        "--elbo",
        choices=["trace", "meanfield"],
        help="Trace_ELBO (default) or TraceMeanField_ELBO (analytic KLs; valid for "
        f"{' and '.join(MEANFIELD_MODELS)} only, whose guides draw every layer from x alone)",
    )
    p.add_argument("--beta", type=_positive_float, help="vae only: KL weight of the flat VAE (beta-VAE); default 1")
    p.add_argument("--noise-injection", choices=["concat", "gated_add"], help="vlae only: ladder combination")
    p.add_argument(
        "--fade-in",
        type=_nonnegative_int,
        help="vlae only: steps per layer of a progressive fade-in of lower layers (0: off; default: the preset's)",
    )
    p.add_argument("--device", type=_device, default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument(
        "--cuda-graph",
        choices=CUDA_GRAPH_MODES,
        help="capture the training step in a CUDA graph after the validated steps: auto (on CUDA; default), on (CUDA "
        "only) or off; a failed capture trains eagerly with one warning",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32 (default) or bf16: the networks' forward pass in bfloat16, every log-probability in float32",
    )
    p.add_argument(
        "--tf32",
        type=_on_off,
        metavar="{on,off}",
        help="on CUDA, matrix products and convolutions in TF32 (on; default) or full float32 (off)",
    )
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
    p.add_argument(
        "--checkpoint-seconds",
        type=_nonnegative_float,
        metavar="S",
        help="also checkpoint once S seconds of wall time have passed since the last checkpoint, so that a crash "
        "loses at most about S seconds of training (0: off; default: off)",
    )
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
    p.add_argument(
        "--eval-dci",
        choices=["gbt", "lda"],
        default="gbt",
        help="DCI importances of the end-of-run disentanglement scores (sprites, shapes3d): gbt, disentanglement_lib's "
        "gradient-boosted trees (minutes on a CPU; default), or lda, a fast variant not comparable with published DCI",
    )
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    return p


# Flags that replace a ModelConfig field, and flags that replace a TrainConfig field, each of the same name.
MODEL_FLAGS = ("likelihood", "latent_dims", "obs_scale", "beta", "noise_injection")
TRAIN_FLAGS = (
    "num_steps", "batch_size", "lr", "anneal", "elbo", "log_every", "checkpoint_every", "fade_in", "keep_every",
    "cuda_graph", "tf32", "precision", "checkpoint_seconds",
)  # fmt: skip
#: Train flags that change when a run stops, logs and checkpoints, not what it computes: a resume takes them as given.
SCHEDULE_FLAGS = ("num_steps", "log_every", "checkpoint_every", "keep_every", "checkpoint_seconds")


def _overrides(args) -> tuple:
    """``(model, train)``: the settings given on the command line, as dicts of the config fields they replace."""
    given = lambda flags: {f: getattr(args, f) for f in flags if getattr(args, f) is not None}  # noqa: E731
    return given(MODEL_FLAGS), given(TRAIN_FLAGS)


def check_flags(kind: str, args) -> None:
    """Refuse flags that model ``kind`` would ignore (``--beta``, ``--fade-in``, ``--noise-injection``) or under
    which it would not train its ELBO (``--elbo meanfield`` for the stacked HVAEs), and ``--cuda-graph on`` without a
    CUDA device.  Needs no data, so the command line calls it first.

    :raises ValueError: naming the flag and the fix.
    """
    model_over, train_over = _overrides(args)
    if train_over.get("cuda_graph") == "on":  # refused without a CUDA device
        use_cuda_graph("on", resolve_device(getattr(args, "device", "auto")))
    if kind != "vlae" and "noise_injection" in model_over:
        raise ValueError(f"--noise-injection combines the vlae's ladder inputs and {kind} has none: drop it")
    check_settings(kind, train_over.get("elbo", "trace"), model_over.get("beta", 1.0), train_over.get("fade_in", 0))


def _checked(config: RunConfig, args, from_preset: bool) -> RunConfig:
    """:func:`check_flags`; for a new run (``from_preset``), replace the preset's settings that the model cannot use
    and no flag named (a fade-in without a ladder, meanfield for the stacked HVAEs) by the defaults, so that the saved
    config says what is trained; then :func:`~pyro_vlae.training.runs.check_settings` on the result.

    :raises ValueError: naming the flag and the fix.
    """
    kind = config.model_kind
    check_flags(kind, args)
    _, train_over = _overrides(args)
    if from_preset and kind != "vlae" and "fade_in" not in train_over:
        config.train = dataclasses.replace(config.train, fade_in=0)
    if from_preset and kind not in MEANFIELD_MODELS and "elbo" not in train_over and config.train.elbo == "meanfield":
        config.train = dataclasses.replace(config.train, elbo="trace")
    check_settings(kind, config.train.elbo, config.model.beta, config.train.fade_in)
    return config


def config_from_args(args, image_shape, cuda: bool) -> RunConfig:
    """A new run's config: the preset's, with the fields that flags name replaced.

    :raises ValueError: for a flag that the model would ignore, or a combination that is not its ELBO.
    """
    preset = P.get_preset(args.preset or P.default_preset_name(args.dataset, cuda))
    model_over, train_over = _overrides(args)
    model = dataclasses.replace(preset.model, **model_over)
    train = dataclasses.replace(preset.train, **train_over)
    P.check_image_shape(model, image_shape, args.dataset)
    config = RunConfig(
        args.model, args.dataset, preset.name, model, train, args.seed, args.data_dir, run_id=new_run_id()
    )
    return _checked(config, args, from_preset=True)


def saved_config(state: dict) -> RunConfig:
    """The config of a checkpoint to resume.  Runs of other models saved before a preset's fade-in was dropped for
    them carry one that never acted; it is dropped here too."""
    config = RunConfig.from_dict(state["config"])
    if config.model_kind != "vlae" and config.train.fade_in:
        config.train = dataclasses.replace(config.train, fade_in=0)
    return config


def forced_config(args, saved: RunConfig, cuda: bool) -> RunConfig:
    """``--force-config``: the saved run with only the flags given on the command line changed."""
    model_over, train_over = _overrides(args)
    dataset = args.dataset or saved.dataset
    preset = args.preset or (saved.preset if dataset == saved.dataset else P.default_preset_name(dataset, cuda))
    model = saved.model if preset == saved.preset else P.get_preset(preset).model
    config = RunConfig(
        args.model or saved.model_kind,
        dataset,
        preset,
        dataclasses.replace(model, **model_over),
        dataclasses.replace(saved.train, **train_over),
        saved.seed,
        saved.data_dir,
        dict(saved.extra),
        run_id=saved.run_id,
    )
    return _checked(config, args, from_preset=False)


def apply_schedule_flags(args, config: RunConfig) -> RunConfig:
    """On a resume: the flags of :data:`SCHEDULE_FLAGS` given on the command line replace the saved settings (they
    change no step's numbers, so they need no ``--force-config``)."""
    over = {f: getattr(args, f) for f in SCHEDULE_FLAGS if getattr(args, f, None) is not None}
    if over:
        config.train = dataclasses.replace(config.train, **over)
    return config


def check_weights_fit(config: RunConfig, state: dict) -> None:
    """Refuse a forced configuration whose networks cannot take the checkpoint's weights."""
    model, guide, _, _ = build(config, "cpu")
    try:
        load_weights(model, guide, state, config)
    except RuntimeError as e:
        why = " ".join(str(e).split())[:200]
        raise CheckpointError(
            f"the checkpoint's weights do not fit a {config.model_kind} model with preset {config.preset} ({why}); "
            "--force-config can change training settings, not the architecture: start a new run instead"
        ) from None


def resume_conflicts(args, saved: RunConfig) -> list:
    """Flags given on the command line that contradict the saved run (model, dataset, preset, architecture)."""
    out = []
    for flag, saved_value in (("model", saved.model_kind), ("dataset", saved.dataset), ("preset", saved.preset)):
        value = getattr(args, flag)
        if value is not None and value != saved_value:
            out.append(f"--{flag} {value} (the run has {saved_value})")
    for flag in MODEL_FLAGS:
        value = getattr(args, flag)
        if value is not None and value != getattr(saved.model, flag):
            out.append(f"--{flag.replace('_', '-')} {value} (the run has {getattr(saved.model, flag)})")
    for flag in ("batch_size", "lr", "anneal", "elbo", "fade_in", "cuda_graph", "tf32", "precision"):
        value, saved_value = getattr(args, flag), getattr(saved.train, flag)
        if value is not None and value != saved_value:
            shown = {True: "on", False: "off"} if flag == "tf32" else {}
            value, saved_value = shown.get(value, value), shown.get(saved_value, saved_value)
            out.append(f"--{flag.replace('_', '-')} {value} (the run has {saved_value})")
    return out
