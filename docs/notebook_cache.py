"""One execution of the tutorial, shared by the test suite and the documentation build.

``tests/test_tutorial.py`` executes ``docs/tutorial.ipynb`` anyway; it hands the executed notebook to
:func:`save_executed`, which stores it under ``docs/_build/`` stamped with :func:`source_digest`: a SHA-256 of the
notebook and of every file of the package it runs (``pyro_vlae/`` with the shipped weights, ``models/``,
``guides/``). The docs build (``docs/conf.py``) calls :func:`load_into_cache`, which puts that copy into myst-nb's
jupyter-cache only when its stamp equals the digest of the tree being built and its code cells are the notebook's
own; myst-nb then renders the stored outputs instead of running the notebook again. Without such a copy (a fresh
clone, or code changed since the tests ran) the build executes the notebook itself, once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
NOTEBOOK = os.path.join(DOCS, "tutorial.ipynb")
BUILD = os.path.join(DOCS, "_build")
EXECUTED = os.path.join(BUILD, "tutorial.executed.ipynb")
SOURCES = ("pyro_vlae", "models", "guides")
DIGEST_KEY = "pyro_vlae_source_digest"


def source_digest() -> str:
    """SHA-256 over the notebook and every package file the tutorial's outputs depend on (``__pycache__`` excluded)."""
    files = [NOTEBOOK]
    for top in SOURCES:
        for folder, dirs, names in os.walk(os.path.join(ROOT, top)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            files += [os.path.join(folder, n) for n in sorted(names) if not n.endswith((".pyc", ".tmp"))]
    h = hashlib.sha256()
    for path in files:
        h.update(os.path.relpath(path, ROOT).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def cache_path() -> str:
    """The jupyter-cache folder of this tree: one per source digest, so changed code never reuses stale outputs."""
    return os.path.join(BUILD, ".jupyter_cache", source_digest()[:16])


def write_kernelspec(parent: str) -> str:
    """Write a ``python3`` kernelspec under ``parent/kernels`` that starts this interpreter; return ``parent``.

    Put ``parent`` first on ``JUPYTER_PATH`` so that notebooks run with this interpreter (and its installed
    ``pyro_vlae``) rather than whatever ``python`` is first on ``PATH``.
    """
    spec = os.path.join(parent, "kernels", "python3")
    os.makedirs(spec, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    with open(os.path.join(spec, "kernel.json"), "w") as f:
        json.dump({"argv": argv, "display_name": "Python 3", "language": "python"}, f)
    return parent


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def save_executed(executed, skip: int = 0) -> str:
    """Store the outputs of ``executed`` (a run of the tutorial with ``skip`` extra code cells in front) for the docs.

    The outputs are copied into a fresh read of the notebook, so its cells and metadata are the source's own, and
    the copy is stamped with :func:`source_digest`. Written atomically; returns the path.
    """
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    ran = _code_cells(executed)[skip:]
    cells = _code_cells(nb)
    if [c.source for c in ran] != [c.source for c in cells]:
        raise ValueError("the executed notebook's code cells differ from docs/tutorial.ipynb")
    for cell, done in zip(cells, ran):
        cell.outputs = done.outputs
        cell.execution_count = None if done.execution_count is None else done.execution_count - skip
    nb.metadata[DIGEST_KEY] = source_digest()
    os.makedirs(BUILD, exist_ok=True)
    tmp = f"{EXECUTED}.{os.getpid()}.tmp"
    nbformat.write(nb, tmp)
    os.replace(tmp, EXECUTED)
    return EXECUTED


def stored_execution():
    """The stored execution of the tutorial if it belongs to this tree (same digest, same code cells), else ``None``.

    Needs only nbformat, so the test suite checks it without the docs extra's jupyter-cache.
    """
    import nbformat

    if not os.path.exists(EXECUTED):
        return None
    executed = nbformat.read(EXECUTED, as_version=4)
    if executed.metadata.pop(DIGEST_KEY, None) != source_digest():
        return None
    source = nbformat.read(NOTEBOOK, as_version=4)
    if [(c.source, c.metadata) for c in _code_cells(executed)] != [(c.source, c.metadata) for c in _code_cells(source)]:
        return None
    return executed


def load_into_cache(cache: str) -> bool:
    """Put the stored execution into the jupyter-cache at ``cache`` if it belongs to this tree; say whether it did."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    executed = stored_execution()
    if executed is None:
        return False
    bundle = CacheBundleIn(executed, NOTEBOOK, data={"shared_from": "tests/test_tutorial.py"})
    get_cache(cache).cache_notebook_bundle(bundle, check_validity=False, overwrite=True)
    return True
