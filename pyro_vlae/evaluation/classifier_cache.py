"""The on-disk cache of trained classifiers (:func:`~pyro_vlae.evaluation.classifier.get_classifier`): the data
fingerprint in its key, its atomic writes (a failed write is logged, and the classifier is still returned) and the
validation of cached weights before they are used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["atomic_write", "data_fingerprint", "load_weights", "write_json"]


def data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """Hex SHA-256 of the raw bytes, shapes and dtypes of inputs ``x`` and labels ``y``, used as a cache key."""
    h = hashlib.sha256()
    for name, t in (("x", x), ("y", y)):
        t = torch.as_tensor(t).detach().to("cpu")
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        t = t.contiguous().reshape(-1)
        if t.numel():
            # viewing as bytes avoids a copy and works for dtypes numpy lacks (e.g. bfloat16)
            h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def atomic_write(path: str, write: Callable[[str], None], log: Callable[[str], object]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``; a failure is logged, not raised."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # the classifier is still usable, only the cache entry is missing
        log(f"could not write the classifier cache file {path} ({type(e).__name__}: {e})")
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def write_json(path: str, obj: dict, log: Callable[[str], object]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)

    atomic_write(path, write, log)


def load_weights(path: str, clf: nn.Module) -> None:
    """Load a state dict into ``clf``; raises on anything wrong. ``clf`` must be discarded if this raises."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not a state dict of tensors")
    if any(v.is_floating_point() and not torch.isfinite(v).all() for v in state.values()):
        raise ValueError("non-finite weights")
    clf.load_state_dict(state, strict=True)  # raises on missing, unexpected or mis-shaped entries
