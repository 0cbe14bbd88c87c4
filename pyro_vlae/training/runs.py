"""A run's identity and its checkpoints: :class:`RunConfig`, :func:`build` (model, guide, optimiser, SVI),
:func:`save_run_checkpoint` and :func:`load_run`.
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
from .checkpoint import atomic_write_json, load_checkpoint, rng_state, save_checkpoint
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
    return torch.device(name)


def build(config: RunConfig, device) -> tuple:
    """Model, guide (on ``device``), Pyro Adam optimiser and SVI object.  Clears the param store first."""
    pyro.clear_param_store()
    model = get_model(config.model_kind, config.model).to(device)
    guide = get_guide(config.model_kind, config.model).to(device)
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


def load_run(run_dir: str, device="cpu", checkpoint: str = "latest.pt"):
    """Rebuild ``(model, guide, config, state)`` from a run folder's checkpoint (eval mode, on ``device``)."""
    state = load_checkpoint(os.path.join(run_dir, "checkpoints", checkpoint), map_location=device)
    config = RunConfig.from_dict(state["config"])
    model, guide, _, _ = build(config, device)
    model.load_state_dict(state["model"])
    guide.load_state_dict(state["guide"])
    model.eval(), guide.eval()
    return model, guide, config, state


def write_config(run_dir: str, config: RunConfig, argv=None) -> None:
    d = config.to_dict()
    if argv is not None:
        d["command"] = list(argv)
    atomic_write_json(os.path.join(run_dir, "config.json"), d)
