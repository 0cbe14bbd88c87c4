"""Pretrained weights shipped with the package, loaded offline: :func:`load_pretrained` and :func:`load_classifier`.

Everything lives in this one folder (installed as package data), two files per entry:

* ``<name>.pt``: the weights (``torch.load(..., weights_only=True)``), mostly in half precision, and the
  architecture they need (``spec``: the model's run configuration, or the classifier's sizes);
* ``<name>.json``: provenance: the training command, the commits that trained and exported it, the run's evaluation
  numbers, the SHA-256 of the ``.pt`` file (checked on the very bytes that are loaded), the measured effect of half
  precision, and a copy of the architecture for reading.

The networks are built from the ``spec`` inside the hashed ``.pt``, and a ``.json`` whose copy differs from it (an
edited ``obs_scale`` or ``value_range``, say) is refused, so the hash covers what is loaded, architecture included.

Entries:

* ``vlae-mnist``: the default job, ``python -m pyro_vlae.run --model vlae`` on CPU (preset ``mnist-cpu``: 3 layers of
  2-d codes, 28x28 MNIST, Laplace likelihood);
* ``mnist-classifier``: the digit classifier the evaluation trains (:class:`~pyro_vlae.evaluation.classifier.SmallCNN`
  on the 60k training images), for judging generated digits.

Regenerate both from a fresh run with ``python -m pyro_vlae.pretrained.export RUN_DIR`` (see that module).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os

import torch
from pyro.nn import PyroModule

from ..evaluation.classifier import SmallCNN
from ..guides import get_guide
from ..models import get_model
from ..nets import ModelConfig

FOLDER = os.path.dirname(os.path.abspath(__file__))
#: Bumped when the layout of the ``.pt`` files changes.  2: the architecture is stored in the ``.pt`` (``spec``).
FORMAT = 2
#: The provenance keys that make up an entry's architecture, by kind: stored in the ``.pt`` as its ``spec``.
SPEC_KEYS = {"model": ("kind", "config"), "classifier": ("kind", "in_channels", "num_classes", "feature_dim")}


class PretrainedError(ValueError):
    """A pretrained entry is unknown, missing or does not match its provenance file."""


def available() -> list:
    """Names of the shipped entries (each a ``<name>.pt`` beside a ``<name>.json``)."""
    names = [f[:-5] for f in os.listdir(FOLDER) if f.endswith(".json")]
    return sorted(n for n in names if os.path.exists(os.path.join(FOLDER, n + ".pt")))


def info(name: str = "vlae-mnist") -> dict:
    """The provenance of entry ``name``: command, commit, evaluation numbers, half-precision check, SHA-256."""
    path = os.path.join(FOLDER, name + ".json")
    if name not in available():
        raise PretrainedError(
            f"no pretrained entry {name!r}; available: {', '.join(available()) or 'none'} "
            "(regenerate with python -m pyro_vlae.pretrained.export RUN_DIR)"
        )
    with open(path) as f:
        return json.load(f)


def spec_of(meta: dict) -> dict:
    """The architecture part of a provenance dict (:data:`SPEC_KEYS` of its kind), as JSON would give it back."""
    keys = SPEC_KEYS.get(meta.get("kind"))
    if keys is None:
        raise PretrainedError(f"unknown pretrained kind {meta.get('kind')!r}; expected one of {sorted(SPEC_KEYS)}")
    return json.loads(json.dumps({k: meta.get(k) for k in keys}))


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}.{key}" if prefix else key).items()}
    return {prefix: tree}


def _spec_differences(spec: dict, meta: dict, name: str) -> list:
    """``"<dotted key>: <json value> in <name>.json, <value> in the hashed <name>.pt"`` for each difference."""
    theirs, ours = _flat({k: meta.get(k) for k in spec}), _flat(spec)
    return [
        f"{k}: {json.dumps(theirs.get(k))} in {name}.json, {json.dumps(ours.get(k))} in the hashed {name}.pt"
        for k in sorted(set(theirs) | set(ours), key=str)
        if theirs.get(k) != ours.get(k)
    ]


def checked_bytes(path: str, meta: dict) -> bytes:
    """The bytes of the ``.pt`` file at ``path``, read once, after checking them against ``meta["sha256"]``."""
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        name = os.path.basename(path)[:-3]
        raise PretrainedError(
            f"{path} does not match the SHA-256 in {name}.json: the file changed after it was exported; reinstall "
            "pyro_vlae or regenerate it with python -m pyro_vlae.pretrained.export RUN_DIR"
        )
    return data


def _state(name: str, kind: str) -> tuple:
    """``(weights dict, architecture, provenance)`` of entry ``name``, after checking its kind, SHA-256, format and
    that the ``.json``'s architecture is the one inside the hashed ``.pt``."""
    meta = info(name)
    if meta.get("kind") != kind:
        raise PretrainedError(f"{name!r} is a {meta.get('kind')!r} entry, not a {kind!r} one")
    path = os.path.join(FOLDER, name + ".pt")
    data = checked_bytes(path, meta)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # the bytes that were checked
    found = state.get("format") if isinstance(state, dict) else None
    if found == 1:
        raise PretrainedError(
            f"{path} is a format-1 pretrained file, written before the architecture was stored with the weights; this "
            f"pyro_vlae reads format {FORMAT}: re-export it from its run (python -m pyro_vlae.pretrained.export "
            f"RUN_DIR), or, if {name}.json is the one exported with it, convert it with python -m "
            f"pyro_vlae.pretrained.repack {name} --folder {FOLDER}"
        )
    if found != FORMAT or not isinstance(state.get("spec"), dict):
        raise PretrainedError(
            f"{path} is not a format-{FORMAT} pretrained file (format {found!r}); install the pyro_vlae version that "
            "wrote it, or re-export it with python -m pyro_vlae.pretrained.export RUN_DIR"
        )
    spec = state["spec"]
    diffs = _spec_differences(spec, meta, name) if spec.get("kind") == kind else [f"kind: {spec.get('kind')!r}"]
    if diffs:
        raise PretrainedError(
            f"{name}.json does not describe the architecture stored in the hashed {name}.pt ({'; '.join(diffs[:4])}"
            f"{f'; and {len(diffs) - 4} more' if len(diffs) > 4 else ''}): the "
            "provenance file was edited; reinstall pyro_vlae or regenerate the entry with python -m "
            "pyro_vlae.pretrained.export RUN_DIR"
        )
    return state, spec, meta


def _float32(state_dict: dict) -> dict:
    """Half-precision floating tensors back to float32; integer buffers (batch counts) untouched."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def model_config(meta: dict) -> ModelConfig:
    """The :class:`ModelConfig` of a provenance dict or a model's ``spec``, keeping only the fields this version
    knows."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig.from_dict({k: v for k, v in meta["config"]["model"].items() if k in known})


def load_pretrained(name: str = "vlae-mnist", device: str | torch.device = "cpu") -> tuple[PyroModule, PyroModule]:
    """The shipped model and guide ``name``, in eval mode and float32 on ``device``.  Works offline.

    The ladder gains of the VLAE's fade-in are set explicitly to the values the weights were trained with (all 1 at
    the end of a full run), so the model is the plain VLAE whatever state a fresh module starts in.  Use them as any
    pyro_vlae pair, e.g. ``poutine.condition(model, data={"z3": code})(batch_size=16)``.

    :param name: an entry of :func:`available`.
    :param device: where to put the networks.
    :returns: ``(model, guide)``; :func:`info` gives the provenance.
    :raises PretrainedError: for an unknown name, or files that do not match their provenance.

    >>> import pyro_vlae as pv
    >>> model, guide = pv.load_pretrained("vlae-mnist")
    >>> type(model).__name__, type(guide).__name__, model.training
    ('VLAEModel', 'VLAEGuide', False)
    >>> codes = guide(model(batch_size=4))  # the posterior means of z1, z2, z3 for four generated digits
    >>> [tuple(c.shape) for c in codes]
    [(4, 2), (4, 2), (4, 2)]
    """
    state, spec, _ = _state(name, "model")
    config = model_config(spec)
    kind = spec["config"]["model_kind"]
    model = get_model(kind, config).to(device)
    guide = get_guide(kind, config).to(device)
    model_sd, gain = _float32(state["model"]), state.get("ladder_gain")
    if gain is not None and "ladder_gain" in model.state_dict() and "ladder_gain" not in model_sd:
        model_sd["ladder_gain"] = gain  # a version that saves the gains with the weights
    model.load_state_dict(model_sd)
    guide.load_state_dict(_float32(state["guide"]))
    if gain is not None:
        with torch.no_grad():
            model.ladder_gain.copy_(gain.float())
    model.eval(), guide.eval()
    return model, guide


def load_classifier(name: str = "mnist-classifier", device="cpu") -> SmallCNN:
    """The shipped digit classifier ``name`` (:class:`SmallCNN`, images in [0, 1]), in eval mode on ``device``.

    Its test accuracy on the 10k MNIST test images is ``info(name)["test_accuracy"]``.
    """
    state, spec, _ = _state(name, "classifier")
    clf = SmallCNN(spec["in_channels"], spec["num_classes"], spec["feature_dim"])
    clf.load_state_dict(_float32(state["classifier"]))
    return clf.to(device).eval()


__all__ = [
    "FOLDER",
    "FORMAT",
    "PretrainedError",
    "available",
    "info",
    "load_classifier",
    "load_pretrained",
    "model_config",
    "spec_of",
]
