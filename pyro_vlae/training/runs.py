"""A run's identity and its checkpoints: :class:`RunConfig`, :func:`build` (model, guide, optimiser, SVI),
:func:`save_run_checkpoint`, :func:`load_weights` and :func:`load_run`; :func:`check_objective` refuses settings under
which training would not optimise the ELBO the user asked for, and :func:`check_run_identity` a checkpoint that belongs
to another run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from ..guides import get_guide
from ..models import get_model
from ..nets import ModelConfig
from ..presets import TrainConfig
from .annealing import ladder_gains
from .checkpoint import atomic_write_json, load_checkpoint, read_json_dict, rng_state, save_checkpoint
from .optim import FusedAdam


@dataclass
class RunConfig:
    """Everything needed to rebuild a run: saved as ``config.json`` and inside every checkpoint."""

    model_kind: str
    dataset: str
    preset: str
    model: ModelConfig
    train: TrainConfig
    seed: int = 0
    data_dir: str = "data"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "model_kind": self.model_kind,
            "dataset": self.dataset,
            "preset": self.preset,
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "seed": self.seed,
            "data_dir": self.data_dir,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = dict(d)
        return cls(
            model_kind=d["model_kind"],
            dataset=d["dataset"],
            preset=d["preset"],
            model=ModelConfig.from_dict(d["model"]),
            train=TrainConfig.from_dict(d["train"]),
            seed=int(d.get("seed", 0)),
            data_dir=d.get("data_dir", "data"),
            extra=dict(d.get("extra", {})),
        )


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ValueError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return device


#: Model kinds whose guide makes every ``q(z_l|x)`` depend on ``x`` only: the analytic KLs of
#: ``TraceMeanField_ELBO`` then sum to the ELBO.  The stacked HVAEs' guide draws ``z_{l+1} ~ q(z_{l+1}|z_l)``.
MEANFIELD_MODELS = ("vlae", "vae")


def check_objective(config: RunConfig) -> None:
    """Refuse a config under which training would optimise something other than the ELBO: ``elbo="meanfield"`` for
    the stacked HVAEs (Pyro's analytic KL for ``z_l`` holds the model's parent ``z_{l+1}`` fixed, but the guide draws
    ``z_{l+1}`` from ``q(z_{l+1}|z_l)``, so the sum is not the ELBO).

    Called at the start of :func:`pyro_vlae.training.loop.fit`, not by :func:`build`, so that runs saved before this
    check still load for evaluation.  Settings a model merely ignores (``beta`` outside the ``vae``, ``fade_in``
    outside the ``vlae``, as the presets carry them) are left to the command line, which refuses them as flags
    (:func:`check_settings`).

    :raises ValueError: naming the setting and the fix.
    """
    check_settings(config.model_kind, config.train.elbo)


def check_settings(kind: str, elbo: str = "trace", beta: float = 1.0, fade_in: int = 0) -> None:
    """Refuse ``elbo`` as :func:`check_objective` does, and settings that ``kind`` would ignore: ``beta != 1`` for any
    model but the flat ``vae`` (the only one that reads it), ``fade_in > 0`` for any model but the ``vlae`` (the only
    one with ladder gains).  The command line checks its flags with it before reading data.

    :raises ValueError: naming the flag and the fix.
    """
    if elbo == "meanfield" and kind not in MEANFIELD_MODELS:
        raise ValueError(
            f"--elbo meanfield is valid for {' and '.join(MEANFIELD_MODELS)} only, whose guides draw every layer from "
            f"x alone; the {kind} guide draws z_(l+1) from q(z_(l+1)|z_l), so TraceMeanField_ELBO's analytic KLs "
            f"would not sum to the ELBO: use --elbo trace with --model {kind}"
        )
    if beta != 1 and kind != "vae":
        raise ValueError(
            f"--beta {beta} weights the KL of the flat vae only and {kind} would ignore it: drop --beta, "
            f"or use --anneal const:{beta} to scale every layer's KL by {beta}"
        )
    if fade_in and kind != "vlae":
        raise ValueError(
            f"--fade-in {fade_in} fades in the ladder inputs of the vlae only and {kind} would ignore it: drop "
            "--fade-in (or pass --fade-in 0)"
        )


def build_networks(config: RunConfig, device) -> tuple:
    """The model and guide of ``config`` on ``device``, and nothing of training's machinery (no optimiser, no SVI):
    what evaluation needs.  Clears the param store first."""
    pyro.clear_param_store()
    model = get_model(config.model_kind, config.model).to(device)
    guide = get_guide(config.model_kind, config.model).to(device)
    return model, guide


def build(config: RunConfig, device) -> tuple:
    """Model, guide (on ``device``), Pyro Adam optimiser and SVI object.  Clears the param store first."""
    model, guide = build_networks(config, device)
    optim = FusedAdam({"lr": config.train.lr})
    elbo_cls = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}
    if config.train.elbo not in elbo_cls:
        raise ValueError(f"--elbo must be one of {sorted(elbo_cls)}, got {config.train.elbo!r}")
    svi = SVI(model, guide, optim, elbo_cls[config.train.elbo]())
    return model, guide, optim, svi


def save_run_checkpoint(run_dir: str, model, guide, optim, step: int, config: RunConfig, keep: bool = False) -> str:
    """Write ``checkpoints/latest.pt`` (and ``step<k>.pt`` when ``keep``) atomically; returns the path."""
    state = {
        "model": model.state_dict(),
        "guide": guide.state_dict(),
        "optim": optim.get_state(),
        "step": int(step),
        "rng": rng_state(),
        "config": config.to_dict(),
        "format": 1,
    }
    folder = os.path.join(run_dir, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "latest.pt")
    save_checkpoint(path, state)
    if keep:
        save_checkpoint(os.path.join(folder, f"step{step}.pt"), state)
    return path


def load_weights(model, guide, state: dict, config: RunConfig) -> None:
    """Load a checkpoint's weights into ``model`` and ``guide`` (strictly: every entry must fit).

    The VLAE's ladder gains (the fade-in state) are part of its state dict.  Checkpoints written before they were
    lack them; for those the gains are recomputed from the step and the schedule, as training had set them for the
    last step it took (``ladder_gains(step - 1)``).
    """
    weights = state["model"]
    if "ladder_gain" in model.state_dict() and "ladder_gain" not in weights:
        gains = ladder_gains(max(int(state["step"]) - 1, 0), config.model.num_layers, config.train.fade_in)
        weights = {**weights, "ladder_gain": torch.tensor(gains, dtype=model.ladder_gain.dtype)}
    model.load_state_dict(weights)
    guide.load_state_dict(state["guide"])


def load_run(run_dir: str, device="cpu", checkpoint: str = "latest.pt"):
    """Rebuild ``(model, guide, config, state)`` from a run folder's checkpoint (eval mode, on ``device``).

    The model is the one that was trained up to that checkpoint, fade-in gains included (:func:`load_weights`).
    Settings that :func:`check_objective` now refuses still load, so that older runs can be evaluated.
    """
    state = load_checkpoint(os.path.join(run_dir, "checkpoints", checkpoint), map_location=device)
    config = RunConfig.from_dict(state["config"])
    model, guide = build_networks(config, device)
    load_weights(model, guide, state, config)
    model.eval(), guide.eval()
    return model, guide, config, state


def check_run_identity(run_dir: str, config: RunConfig, checkpoint: str = "checkpoints/latest.pt") -> None:
    """Refuse to resume a checkpoint of another run: one whose model kind, dataset or latent sizes differ from the run
    folder's ``config.json`` (a checkpoint copied in from elsewhere would otherwise train on under the wrong name).
    A folder without a readable ``config.json`` (runs older than it) is not checked.

    :param config: the configuration saved in the checkpoint.
    :raises ValueError: naming each difference and the fix.
    """
    saved = read_json_dict(os.path.join(run_dir, "config.json"))
    if not saved:
        return
    model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    pairs = {
        "model kind": (config.model_kind, saved.get("model_kind")),
        "dataset": (config.dataset, saved.get("dataset")),
        "latent sizes": (list(config.model.latent_dims), model.get("latent_dims")),
    }
    diffs = [f"{k} {ck} in the checkpoint, {rk} in config.json" for k, (ck, rk) in pairs.items() if ck != rk]
    if diffs:
        raise ValueError(
            f"refusing to resume {run_dir}: its checkpoint {os.path.join(run_dir, checkpoint)} belongs to another run "
            f"({'; '.join(diffs)}). Put this run's own checkpoint back, or resume the checkpoint in the folder of the "
            "run it came from"
        )


def write_config(run_dir: str, config: RunConfig, argv=None) -> None:
    d = config.to_dict()
    if argv is not None:
        d["command"] = list(argv)
    atomic_write_json(os.path.join(run_dir, "config.json"), d)
