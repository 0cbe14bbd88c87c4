"""Trained runs in half precision, packed into the few files a GPU machine returns, and unpacked into run folders.

* :func:`export_half` writes an evaluable copy of a run folder: ``config.json``, ``metrics.jsonl`` and
  ``checkpoints/latest.pt`` with every floating-point weight of the model and the guide in float16 (tensors whose
  values do not fit float16 stay float32), no optimiser state and no RNG state.  ``python -m pyro_vlae.evaluate``
  loads it as it is (``load_state_dict`` copies the float16 values into the float32 networks), and so does
  ``python -m pyro_vlae.pretrained.export RUN --allow-partial --description ...``, which ships it.

**The pack is for evaluation and export only: its runs cannot be resumed.**  A resumable copy would carry the
float32 weights and Adam's two float32 moments, six times the float16 bytes: the ``mnist-paper`` VLAE alone is
49.5 MiB in float16 (about 300 MiB so), the three 32x32 shapes3d models 10.5 MiB (about 63 MiB), and the GPU
machine returns 64 MiB in all (:data:`MAX_TOTAL_BYTES`).  So the copy keeps the weights the evaluation and the
export need, and says what it is: the checkpoint holds ``precision: "float16"``, ``resumable: False`` and an empty
``optim``, and the manifest's ``use`` and each run's ``resumable`` say the same.  The full float32 checkpoint with
its optimiser state stays in the run folder where it was trained (on the GPU machine, gone with it); training on
from a returned run means starting a run from its weights, not ``--resume``.
* :func:`pack` puts exported run folders into one ``models.tar.gz`` and splits it into parts of at most
  :data:`PART_BYTES`, with ``models.manifest.json`` holding each part's size and SHA-256 and the whole archive's.
* :func:`unpack` checks the parts against the manifest, joins them (as ``cat models.tar.gz.part* > models.tar.gz``
  would) and extracts the run folders.  From the command line::

      python benchmarks/gpu/model_pack.py unpack FOLDER_WITH_THE_PARTS --dest runs/paper_scale
      python -m pyro_vlae.evaluate runs/paper_scale/shapes3d_vlae
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

# What the GPU machine returns from its output folder: at most 8 files, 16 MiB each, 64 MiB together.
MAX_FILES, MAX_FILE_BYTES, MAX_TOTAL_BYTES = 8, 16 * 2**20, 64 * 2**20
PART_BYTES = 31 * 2**19  # 15.5 MiB: a part stays under the per-file limit; four leave 2 MiB of the 64 for the rest
MANIFEST = "models.manifest.json"
ARCHIVE = "models.tar.gz"
FLOAT16_MAX = 65504.0
KEPT_FILES = ("config.json", "metrics.jsonl")
#: What the packed runs are for, written into the manifest and printed by ``unpack``.
USE = (
    "evaluation and export only: float16 weights without optimiser or RNG state, so they cannot be resumed "
    "(python -m pyro_vlae.evaluate RUN; python -m pyro_vlae.pretrained.export RUN --allow-partial --description ...)"
)


class PackError(ValueError):
    """A pack or unpack that cannot be done: the message names the problem and the fix."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _half_state(weights: dict) -> tuple[dict, list]:
    """``weights`` with floating-point tensors in float16; returns it and the names kept in float32 (overflow)."""
    import torch

    out, kept = {}, []
    for k, v in weights.items():
        if torch.is_tensor(v) and v.is_floating_point() and v.dtype != torch.float16:
            if v.numel() and float(v.detach().abs().max()) > FLOAT16_MAX:
                kept.append(k)
                out[k] = v
            else:
                out[k] = v.detach().to(torch.float16)
        else:
            out[k] = v
    return out, kept


def export_half(run_dir, dest) -> dict:
    """Write the float16 copy of the run folder ``run_dir`` to ``dest``; returns its description.

    :raises pyro_vlae.training.checkpoint.CheckpointError: when ``run_dir`` has no readable ``latest.pt``.
    """
    from pyro_vlae.training.checkpoint import load_checkpoint, save_checkpoint

    run_dir, dest = Path(run_dir), Path(dest)
    state = load_checkpoint(str(run_dir / "checkpoints" / "latest.pt"))
    model, kept_m = _half_state(state["model"])
    guide, kept_g = _half_state(state["guide"])
    half = {
        "model": model,
        "guide": guide,
        "optim": {},  # evaluation and export need no optimiser state; see the module's docstring
        "step": int(state["step"]),
        "config": state["config"],
        "format": state.get("format", 1),
        "precision": "float16",
        "resumable": False,
    }
    (dest / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_checkpoint(str(dest / "checkpoints" / "latest.pt"), half)
    for name in KEPT_FILES:
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, dest / name)
    numel = sum(v.numel() for sd in (model, guide) for v in sd.values() if hasattr(v, "numel"))
    return {
        "name": dest.name,
        "step": half["step"],
        "batch_size": int(state["config"]["train"]["batch_size"]),
        "numel": int(numel),
        "kept_float32": kept_m + kept_g,
        "resumable": False,
        "checkpoint_bytes": (dest / "checkpoints" / "latest.pt").stat().st_size,
    }


def pack(run_dirs: list, out, max_bytes: int, part_bytes: int = PART_BYTES, tmp_dir=None) -> dict:
    """Pack the exported run folders ``run_dirs`` (in that order) into ``out``: archive parts and the manifest.

    The archive is ``models.tar.gz`` (gzip level 1: float16 weights compress by about a tenth) split into
    ``models.tar.gz.part00``, ``part01``, ...  Runs that would take the parts over ``max_bytes`` are left out, the
    later ones first, and named in the manifest's ``left_out``.

    :param tmp_dir: where the whole archive is built (not ``out``: a killed pack must leave nothing there but parts
        without a manifest, which :func:`unpack` refuses).
    :returns: the manifest (also written to ``out/models.manifest.json``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in [out / MANIFEST, *out.glob(ARCHIVE + ".part*")]:
        old.unlink(missing_ok=True)
    runs, left_out = [Path(r) for r in run_dirs], []
    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        archive = Path(tmp) / ARCHIVE
        while True:
            with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
                for r in runs:
                    tar.add(r, arcname=r.name)
            if archive.stat().st_size <= max_bytes or not runs:
                break
            left_out.insert(0, runs.pop().name)
        parts = []
        with open(archive, "rb") as f:
            for i, block in enumerate(iter(lambda: f.read(part_bytes), b"")):
                name = f"{ARCHIVE}.part{i:02d}"
                (out / name).write_bytes(block)
                parts.append({"file": name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
        manifest = {
            "archive": {"file": ARCHIVE, "bytes": archive.stat().st_size, "sha256": sha256_file(archive)},
            "parts": parts,
            "runs": [r.name for r in runs],
            "left_out": left_out,
            "use": USE,
            "resumable": False,
            "join": f"cat {' '.join(p['file'] for p in parts)} > {ARCHIVE}",
            "unpack": "python benchmarks/gpu/model_pack.py unpack FOLDER --dest runs/paper_scale",
        }
    tmp_manifest = out / ("." + MANIFEST + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_manifest, out / MANIFEST)
    return manifest


def unpack(src, dest) -> list:
    """Check and join the parts in ``src`` and extract the run folders into ``dest``; returns their paths.

    :raises PackError: for a missing manifest or part, or a size or SHA-256 that does not match.
    """
    src, dest = Path(src), Path(dest)
    if not (src / MANIFEST).exists():
        raise PackError(f"{src} holds no {MANIFEST}; point at the folder the GPU machine's files were copied to")
    try:
        manifest = json.loads((src / MANIFEST).read_text())
        parts, whole = manifest["parts"], manifest["archive"]
    except (ValueError, KeyError, TypeError) as e:
        raise PackError(f"{src / MANIFEST} is not a model-pack manifest ({e}); copy the files again") from None
    buf = io.BytesIO()
    for p in parts:
        path = src / p["file"]
        if not path.exists():
            raise PackError(f"{path} is missing: the archive has {len(parts)} parts; copy every {ARCHIVE}.part* file")
        data = path.read_bytes()
        if len(data) != p["bytes"] or hashlib.sha256(data).hexdigest() != p["sha256"]:
            raise PackError(f"{path} does not match the manifest (size or SHA-256); copy it again")
        buf.write(data)
    data = buf.getvalue()
    if len(data) != whole["bytes"] or hashlib.sha256(data).hexdigest() != whole["sha256"]:
        raise PackError(f"the joined parts do not match the manifest's {whole['file']}; copy every part again")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = {m.name.split("/")[0] for m in tar.getmembers()}
        clash = sorted(n for n in names if (dest / n).exists())
        if clash:
            raise PackError(f"{dest} already holds {', '.join(clash)}; remove them or choose another --dest")
        tar.extractall(dest, filter="data")
    return [dest / n for n in manifest["runs"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("unpack", help="check, join and extract the returned parts into run folders")
    u.add_argument("src", help="folder holding models.manifest.json and the models.tar.gz.part* files")
    u.add_argument("--dest", default="runs/paper_scale", help="parent of the extracted run folders")
    args = p.parse_args(argv)
    try:
        runs = unpack(args.src, args.dest)
        print(f"# {USE}")
        for run in runs:
            print(f"python -m pyro_vlae.evaluate {run}")
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
