"""Re-pack a format-1 pretrained entry into the current format: ``python -m pyro_vlae.pretrained.repack NAME``.

Format 1 kept the architecture (the model's config, the classifier's sizes) only in the unhashed ``<name>.json``, so an
edited ``.json`` built other networks around the checked weights.  Format 2 stores it inside the hashed ``<name>.pt``
as ``spec`` (:func:`pyro_vlae.pretrained.spec_of`), and the loader refuses a ``.json`` that disagrees with it.

The re-pack takes the architecture from the ``.json`` as it stands, so use it only on an entry whose ``.json`` is the
one that was exported with the weights (a file under version control, or a fresh install); otherwise re-export from
the run (``python -m pyro_vlae.pretrained.export RUN_DIR``).  It checks the ``.pt`` against the ``.json``'s SHA-256
first, refuses a file that is not format 1, and writes the new ``.pt`` only when its tensors are bit-identical to the
old file's (:func:`weights_digest`); the ``.json`` records the old file's SHA-256 and the weights' digest.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys

import torch

from ..training.checkpoint import atomic_write_bytes, atomic_write_json
from . import FOLDER, FORMAT, PretrainedError, checked_bytes, spec_of

#: The format this module converts from.
OLD_FORMAT = 1


def _tensors(tree, prefix: str = ""):
    """``(dotted key, tensor)`` for every tensor in nested dicts, in sorted key order."""
    if torch.is_tensor(tree):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k in sorted(tree, key=str):
            yield from _tensors(tree[k], f"{prefix}.{k}" if prefix else str(k))


def weights_digest(state: dict) -> str:
    """SHA-256 over every tensor of a pretrained file's dict: its key, dtype, shape and raw bytes, in key order.

    Two files with the same digest hold bit-identical tensors under the same names, whatever else they carry.
    """
    h = hashlib.sha256()
    for key, t in _tensors(state):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read(folder: str, name: str) -> tuple:
    """``(provenance, .pt bytes)`` of entry ``name`` in ``folder``, the bytes checked against its SHA-256."""
    json_path, pt_path = os.path.join(folder, name + ".json"), os.path.join(folder, name + ".pt")
    if not (os.path.exists(json_path) and os.path.exists(pt_path)):
        raise PretrainedError(f"no entry {name!r} in {folder}: it needs both {name}.pt and {name}.json")
    with open(json_path) as f:
        meta = json.load(f)
    return meta, checked_bytes(pt_path, meta)


def repack(name: str, folder: str = FOLDER, log=print) -> dict:
    """Rewrite the format-1 entry ``name`` in ``folder`` in the current format; returns the new provenance.

    :raises PretrainedError: for a missing entry, a ``.pt`` that does not match its SHA-256, a file that is not
        format 1, or (never expected) a re-packed file whose tensors differ from the old file's.
    """
    meta, data = _read(folder, name)
    old = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    found = old.get("format") if isinstance(old, dict) else None
    if found != OLD_FORMAT:
        raise PretrainedError(f"{name}.pt is format {found!r}, not {OLD_FORMAT}: there is nothing to re-pack")
    state = {**{k: v for k, v in old.items() if k != "format"}, "spec": spec_of(meta), "format": FORMAT}
    buf = io.BytesIO()
    torch.save(state, buf)
    new = buf.getvalue()
    digest, back = weights_digest(old), torch.load(io.BytesIO(new), map_location="cpu", weights_only=True)
    if weights_digest(back) != digest or back["spec"] != state["spec"]:
        raise PretrainedError(f"re-packing {name} changed its tensors; the old files are left as they were")
    meta = {
        **meta,
        "format": FORMAT,
        "sha256": hashlib.sha256(new).hexdigest(),
        "bytes": len(new),
        "repacked": {
            "from_format": OLD_FORMAT,
            "from_sha256": meta["sha256"],
            "from_bytes": len(data),
            "weights_digest": digest,
            "weights": "bit-identical to the old file's: same names, dtypes, shapes and bytes (weights_digest)",
            "how": f"python -m pyro_vlae.pretrained.repack {name}",
        },
    }
    atomic_write_bytes(os.path.join(folder, name + ".pt"), new)
    atomic_write_json(os.path.join(folder, name + ".json"), meta)
    log(f"{name}: format {OLD_FORMAT} -> {FORMAT}, {len(data)} -> {len(new)} bytes, weights digest {digest}")
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyro_vlae.pretrained.repack", description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="+", metavar="NAME", help="entries to re-pack (e.g. vlae-mnist mnist-classifier)")
    p.add_argument("--folder", default=FOLDER, help="folder holding NAME.pt and NAME.json (default: the package's)")
    args = p.parse_args(argv)
    try:
        for name in args.names:
            repack(name, args.folder)
    except (PretrainedError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
