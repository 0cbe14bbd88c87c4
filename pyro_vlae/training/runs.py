"""A run's identity and its checkpoints: :class:`RunConfig`, :func:`build` (model, guide, optimiser, SVI),
:func:`save_run_checkpoint` (which never writes a state that is not finite), :func:`load_weights` and
:func:`load_run`; :func:`check_objective` refuses settings under which training would not optimise the ELBO the user
asked for, and :func:`check_run_identity` a checkpoint that belongs to another run.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.nn import PyroModule

from ..guides import get_guide
from ..models import get_model
from ..nets import ModelConfig
from ..presets import TrainConfig
from .annealing import ladder_gains
from .checkpoint import atomic_write_json, load_checkpoint, read_json_dict, rng_state, save_checkpoint
from .optim import FusedAdam


@dataclass
class RunConfig:
    """Everything needed to rebuild a run: saved as ``config.json`` and inside every checkpoint.

    >>> import dataclasses
    >>> import pyro_vlae as pv
    >>> preset = pv.get_preset("tiny")
    >>> config = pv.RunConfig("vlae", "synthetic", "tiny", preset.model, dataclasses.replace(preset.train, num_steps=4))
    >>> config.model_kind, config.dataset, config.train.num_steps
    ('vlae', 'synthetic', 4)
    >>> pv.RunConfig.from_dict(config.to_dict()) == config  # what config.json holds
    True
    """

    model_kind: str
    dataset: str
    preset: str
    model: ModelConfig
    train: TrainConfig
    seed: int = 0
    data_dir: str = "data"
    extra: dict = field(default_factory=dict)
    #: Made once when the run is created (:func:`new_run_id`) and kept by every resume: a checkpoint whose id differs
    #: from its folder's ``config.json`` belongs to another run.  ``""`` for runs saved before ids existed.
    run_id: str = ""

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
            "run_id": self.run_id,
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
            run_id=str(d.get("run_id") or ""),
        )


def new_run_id() -> str:
    """A fresh run identity: 16 random hexadecimal digits (not drawn from the seeded generators, so two runs with the
    same seed still differ)."""
    return secrets.token_hex(8)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a clear error.

    >>> import pyro_vlae as pv
    >>> pv.resolve_device("cpu")
    device(type='cpu')
    >>> pv.resolve_device("auto").type in ("cpu", "cuda")
    True
    """
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


def build(config: RunConfig, device: str | torch.device) -> tuple[PyroModule, PyroModule, FusedAdam, SVI]:
    """Model, guide (on ``device``), Pyro Adam optimiser and SVI object.  Clears the param store first.

    >>> import math
    >>> import pyro_vlae as pv
    >>> preset = pv.get_preset("tiny")
    >>> config = pv.RunConfig("vlae", "synthetic", "tiny", preset.model, preset.train)
    >>> model, guide, optim, svi = pv.build(config, "cpu")
    >>> x, _ = pv.load_data("synthetic", batch_size=16).tensors("train")
    >>> math.isfinite(svi.step(x[:16]))  # one step of training
    True
    >>> type(model).__name__, type(guide).__name__
    ('VLAEModel', 'VLAEGuide')
    """
    model, guide = build_networks(config, device)
    optim = FusedAdam({"lr": config.train.lr})
    elbo_cls = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}
    if config.train.elbo not in elbo_cls:
        raise ValueError(f"--elbo must be one of {sorted(elbo_cls)}, got {config.train.elbo!r}")
    svi = SVI(model, guide, optim, elbo_cls[config.train.elbo]())
    return model, guide, optim, svi


class NonFiniteStateError(ValueError):
    """A checkpoint was not written because a weight, buffer or optimiser state holds NaN or infinity."""

    def __init__(self, step: int, names: list):
        self.step, self.names = int(step), list(names)
        shown = ", ".join(self.names[:5]) + (f" and {len(self.names) - 5} more" if len(self.names) > 5 else "")
        super().__init__(f"the training state is not finite at step {step} (NaN or infinity in {shown})")


def _floating_tensors(obj, prefix: str = ""):
    """``(name, tensor)`` for each floating-point tensor in nested dicts, lists and tuples."""
    if torch.is_tensor(obj):
        if obj.is_floating_point() or obj.is_complex():
            yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _floating_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _floating_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def nonfinite_entries(state: dict) -> list:
    """Names of the floating-point tensors in ``state`` (nested dicts and lists) that hold a NaN or an infinity.

    The flags are computed on each tensor's device and read once per device: one host read for a checkpoint, which
    reads every tensor anyway.
    """
    named = list(_floating_tensors(state))
    by_device: dict = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    bad = set()
    for idx in by_device.values():
        flags = torch.stack([torch.isfinite(named[i][1]).all() for i in idx]).tolist()
        bad.update(i for i, ok in zip(idx, flags) if not ok)
    return [named[i][0] for i in sorted(bad)]


def save_run_checkpoint(run_dir: str, model, guide, optim, step: int, config: RunConfig, keep: bool = False) -> str:
    """Write ``checkpoints/latest.pt`` (and ``step<k>.pt`` when ``keep``) atomically; returns the path.

    :raises NonFiniteStateError: when a parameter, buffer or optimiser-state tensor is not finite; nothing is written,
        so the previous checkpoint stays as it was.
    """
    state = {
        "model": model.state_dict(),
        "guide": guide.state_dict(),
        "optim": optim.get_state(),
        "step": int(step),
        "rng": rng_state(),
        "config": config.to_dict(),
        "format": 1,
    }
    bad = nonfinite_entries({k: state[k] for k in ("model", "guide", "optim")})
    if bad:
        raise NonFiniteStateError(step, bad)
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


def load_run(
    run_dir: str, device: str | torch.device = "cpu", checkpoint: str = "latest.pt"
) -> tuple[PyroModule, PyroModule, RunConfig, dict]:
    """Rebuild ``(model, guide, config, state)`` from a run folder's checkpoint (eval mode, on ``device``).

    The model is the one that was trained up to that checkpoint, fade-in gains included (:func:`load_weights`).
    Settings that :func:`check_objective` now refuses still load, so that older runs can be evaluated.

    >>> import dataclasses, tempfile
    >>> import pyro_vlae as pv
    >>> preset = pv.get_preset("tiny")
    >>> config = pv.RunConfig("vlae", "synthetic", "tiny", preset.model, dataclasses.replace(preset.train, num_steps=4))
    >>> with tempfile.TemporaryDirectory() as run_dir:
    ...     _ = pv.fit(config, pv.load_data("synthetic", batch_size=16), run_dir, "cpu", progress=False)
    ...     model, guide, loaded, state = pv.load_run(run_dir)
    >>> state["step"], loaded == config, model.training
    (4, True, False)
    """
    state = load_checkpoint(os.path.join(run_dir, "checkpoints", checkpoint), map_location=device)
    config = RunConfig.from_dict(state["config"])
    model, guide = build_networks(config, device)
    load_weights(model, guide, state, config)
    model.eval(), guide.eval()
    return model, guide, config, state


#: The ``config.json`` key that records, when a run saved before ids is given one, the settings its id-less checkpoint
#: had (:func:`identity_fields`): until a checkpoint with the new id exists, an id-less one is compared with those.
ADOPTED_FROM = "run_id_adopted_from"


def identity_fields(config: RunConfig) -> dict:
    """The settings :func:`identity_differences` compares, laid out as in ``config.json``."""
    return {
        "model_kind": config.model_kind,
        "dataset": config.dataset,
        "model": {"latent_dims": list(config.model.latent_dims), "likelihood": config.model.likelihood},
        "seed": config.seed,
        "train": {"lr": config.train.lr},
    }


def identity_differences(saved: dict, config: RunConfig) -> list:
    """How the checkpoint's ``config`` differs from its folder's ``config.json`` (``saved``) as another run would.

    The same run id on both sides is the same run: nothing differs, whatever a ``--force-config`` resume changed.
    Otherwise (two ids, or a side saved before ids existed) the model kind, dataset and latent sizes are compared,
    and the likelihood, seed and learning rate where ``config.json`` has them; two different ids lead the list.
    An id-less checkpoint in a folder whose id was adopted for one (:data:`ADOPTED_FROM`) is compared with that
    checkpoint's settings, not with ``config.json``'s, which a ``--force-config`` resume may have changed.
    """
    if not config.run_id and isinstance(saved.get(ADOPTED_FROM), dict):
        saved = saved[ADOPTED_FROM]
    ours, theirs = str(saved.get("run_id") or ""), config.run_id
    if ours and ours == theirs:
        return []
    model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    train = saved.get("train") if isinstance(saved.get("train"), dict) else {}
    always = {
        "model kind": (config.model_kind, saved.get("model_kind")),
        "dataset": (config.dataset, saved.get("dataset")),
        "latent sizes": (list(config.model.latent_dims), model.get("latent_dims")),
    }
    present = {
        "likelihood": (config.model.likelihood, model.get("likelihood")),
        "seed": (config.seed, saved.get("seed")),
        "lr": (config.train.lr, train.get("lr")),
    }
    pairs = {**always, **{k: v for k, v in present.items() if v[1] is not None}}
    diffs = [f"{k} {ck} in the checkpoint, {rk} in config.json" for k, (ck, rk) in pairs.items() if ck != rk]
    if ours and theirs:
        diffs.insert(0, f"run id {theirs} in the checkpoint, {ours} in config.json")
    return diffs


def check_run_identity(run_dir: str, config: RunConfig, checkpoint: str = "checkpoints/latest.pt") -> None:
    """Refuse to resume a checkpoint of another run (a checkpoint copied in from elsewhere would otherwise train on
    under this run's name, and its settings would replace this run's ``config.json``): see
    :func:`identity_differences`.  A folder without a readable ``config.json`` (runs older than it) is not checked.
    A checkpoint saved before run ids that comes from another run with the same model kind, dataset, latent sizes,
    likelihood, seed and learning rate cannot be told apart from this run's own, and resumes.

    :param config: the configuration saved in the checkpoint.
    :raises ValueError: naming each difference (both run ids first) and the fix.
    """
    saved = read_json_dict(os.path.join(run_dir, "config.json"))
    diffs = identity_differences(saved, config) if saved else []
    if diffs:
        raise ValueError(
            f"refusing to resume {run_dir}: its checkpoint {os.path.join(run_dir, checkpoint)} belongs to another run "
            f"({'; '.join(diffs)}). Put this run's own checkpoint back, or resume the checkpoint in the folder of the "
            "run it came from"
        )


def write_config(run_dir: str, config: RunConfig, argv=None, adopted_from: RunConfig | None = None) -> None:
    """Write ``config.json`` (atomically), with the command line ``argv`` and, for a run saved before ids that is
    given one now, the settings of its id-less checkpoint ``adopted_from`` (:data:`ADOPTED_FROM`)."""
    d = config.to_dict()
    if argv is not None:
        d["command"] = list(argv)
    if adopted_from is not None:
        d[ADOPTED_FROM] = identity_fields(adopted_from)
    atomic_write_json(os.path.join(run_dir, "config.json"), d)
