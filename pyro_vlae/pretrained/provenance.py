"""Where an exported entry comes from: the git state of the exporting checkout, the commit that trained the run, and
the run's command as a user types it.

Provenance must name code that reproduces the weights: :func:`provenance` refuses a checkout with uncommitted changes
to tracked files (other than the files the export writes), and a run said to be trained on a changed tree
(``--dirty``), unless ``--allow-dirty`` is given; then the SHA-256 of the changes (``git diff --binary HEAD`` of the
changed files) is recorded beside their names.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

from . import FOLDER

#: The checkout whose git state the export records (the one this package is imported from).
CHECKOUT = os.path.dirname(FOLDER)


def _git(folder: str, *args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=folder, capture_output=True, check=True).stdout


def git_commit(folder: str, ignore=()) -> dict:
    """The git state of the checkout holding ``folder``: ``{"commit": HEAD, "dirty": [changed tracked files],
    "diff_sha256": SHA-256 of their ``git diff --binary HEAD`` or None when clean}``, or nulls outside a checkout.

    :param ignore: paths (absolute, or relative to the current folder) left out of ``dirty``: the export's outputs.
    """
    try:
        root = _git(folder, "rev-parse", "--show-toplevel").decode().strip()
        head = _git(folder, "rev-parse", "HEAD").decode().strip()
        status = _git(folder, "status", "--porcelain", "--untracked-files=no").decode()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None, "diff_sha256": None}
    skip = {os.path.relpath(os.path.realpath(p), os.path.realpath(root)) for p in ignore}
    dirty = [line[3:] for line in status.splitlines() if line[3:] not in skip]
    diff = hashlib.sha256(_git(root, "diff", "--binary", "HEAD", "--", *dirty)).hexdigest() if dirty else None
    return {"commit": head, "dirty": dirty, "diff_sha256": diff}


def public_command(command: list) -> str:
    """The run's recorded command as a user types it: ``python -m pyro_vlae.run ...`` (a run started from the shell
    records ``sys.argv``, ``.../run.py ...``), with ``--run-dir`` shown as ``runs/<the folder's name>``, not the
    exporting machine's path."""
    if command[:3] != ["python", "-m", "pyro_vlae.run"]:
        command = ["python", "-m", "pyro_vlae.run", *command[1:]]
    out = list(command)
    for i, arg in enumerate(out[:-1]):
        if arg == "--run-dir":
            out[i + 1] = "runs/" + os.path.basename(os.path.normpath(out[i + 1]))
    return " ".join(out)


#: The default job (``python -m pyro_vlae.run --model vlae --device cpu``): the only run described as it.
DEFAULT_JOB = {"--model": "vlae", "--device": "cpu"}


def run_dir_of(command: str, default: str) -> str:
    """The ``--run-dir`` of a :func:`public_command` (``runs/<name>``), or ``default`` when it names none."""
    args = command.split()
    return args[args.index("--run-dir") + 1] if "--run-dir" in args[:-1] else default


def is_default_job(command: list) -> bool:
    """Whether a run's recorded command is the default job (any ``--run-dir``)."""
    args = public_command(command).split()[3:]
    flags = dict(zip(args[::2], args[1::2])) if len(args) % 2 == 0 else {}
    flags.pop("--run-dir", None)
    return flags == DEFAULT_JOB and all(a.startswith("--") for a in args[::2])


def provenance(args) -> dict:
    """Which commit trained the run and which exported it; refuses uncommitted changes without ``--allow-dirty``.

    :raises ValueError: naming the changed files and the flag.
    """
    names = [args.name] + ([] if args.no_classifier else [args.classifier_name])
    outputs = [os.path.join(args.out, n + ext) for n in names for ext in (".pt", ".json")]
    exported = git_commit(CHECKOUT, ignore=outputs)
    if exported["commit"] is None and not args.allow_dirty:
        raise ValueError(
            f"{CHECKOUT} is not a git checkout, so the export cannot name the code: export from a clone of the "
            "repository, or pass --allow-dirty to record no commit"
        )
    if exported["dirty"] and not args.allow_dirty:
        raise ValueError(
            f"the checkout {CHECKOUT} has uncommitted changes in {', '.join(exported['dirty'])}: commit them so that "
            "the provenance names code that reproduces the weights, or pass --allow-dirty to export anyway with the "
            "SHA-256 of the changes recorded"
        )
    trained_dirty = args.dirty.split(",") if args.dirty else []
    if trained_dirty and not args.allow_dirty:
        raise ValueError(
            f"--dirty says the run was trained with uncommitted changes in {', '.join(trained_dirty)}: retrain it "
            "from a clean commit, or pass --allow-dirty to export it with those files named"
        )
    if args.commit:
        trained = {"commit": args.commit, "dirty": trained_dirty, "source": "stated with --commit and --dirty"}
    else:
        trained = {**exported, "source": "the exporting checkout (no --commit given)"}
    return {"commit": trained["commit"], "dirty": trained["dirty"], "trained_at": trained, "exported_at": exported}
