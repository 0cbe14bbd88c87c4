"""The house rules of the package layout: imports run one way, no module is over 400 lines, every subpackage ships,
and the public API at the top holds what the README promises."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

import pyro_vlae as pv

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lower number = lower in the house.  A module may import its own wing and any wing of a lower rank; data sits
# beside the rest and imports nothing else of the package.  Everything not listed is the top (CLI, figures, API).
RANKS = {
    "pyro_vlae.data": 0,
    "pyro_vlae.nets": 1,
    "pyro_vlae.presets": 1,
    "pyro_vlae.models": 2,
    "pyro_vlae.guides": 2,
    "pyro_vlae.experiments": 3,
    "pyro_vlae.training": 4,
    "pyro_vlae.evaluation": 5,
}


def _sources():
    """``(dotted module name, path)`` of every module of the installed package, ``models/`` and ``guides/`` too."""
    for path in sorted((ROOT / "pyro_vlae").rglob("*.py")):
        yield ".".join(path.relative_to(ROOT).with_suffix("").parts), path
    for folder in ("models", "guides"):
        for path in sorted((ROOT / folder).glob("*.py")):
            yield f"pyro_vlae.{folder}.{path.stem}", path


def _wing(name: str) -> str | None:
    for wing in sorted(RANKS, key=len, reverse=True):
        if name == wing or name.startswith(wing + "."):
            return wing
    return None


def _imports(name: str, path: pathlib.Path) -> set:
    """The ``pyro_vlae`` modules (and names) that ``path`` imports, relative imports resolved."""
    package = name.rsplit(".", 1)[0] if not name.endswith("__init__") else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out |= {module} | {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("pyro_vlae")}


def test_imports_run_one_way():
    upward = []
    for name, path in _sources():
        wing = _wing(name)
        if wing is None:
            continue  # the top may import everything
        for target in _imports(name, path):
            target_wing = _wing(target)
            if target_wing is None and target not in ("pyro_vlae",):
                upward.append(f"{name} -> {target} (the top)")
            elif target_wing is not None and target_wing != wing:
                if wing == "pyro_vlae.data" or RANKS[target_wing] > RANKS[wing]:
                    upward.append(f"{name} -> {target}")
    assert not upward, "imports that run up the house:\n" + "\n".join(upward)


def test_no_module_over_400_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for _, p in _sources() if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long


def test_every_subpackage_is_installed():
    setup = (ROOT / "setup.py").read_text()
    listed = set(re.findall(r'"(pyro_vlae(?:\.[a-z_]+)*)"', setup.split("packages=", 1)[1].split("]", 1)[0]))
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pyro_vlae").rglob("__init__.py")}
    assert found <= listed, f"subpackages missing from setup.py: {sorted(found - listed)}"


def test_each_subpackage_says_what_it_holds():
    for init in (ROOT / "pyro_vlae").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, f"{init.relative_to(ROOT)} has no docstring saying what the folder holds"


@pytest.mark.parametrize(
    "name",
    [
        "get_model", "get_guide", "get_preset", "load_data", "load_run", "fit", "fix_layers", "intervene_layer",
        "traverse_layer", "variance_share", "gibbs_chain", "importance_log_likelihood", "bits_per_dim", "mig",
        "sap", "dci",
    ],
)  # fmt: skip
def test_public_api(name):
    assert callable(getattr(pv, name))
    assert name in pv.__all__


def test_public_names_are_the_internal_objects():
    from pyro_vlae.evaluation.likelihood import importance_log_likelihood
    from pyro_vlae.experiments.gibbs import gibbs_chain
    from pyro_vlae.experiments.interventions import fix_layers
    from pyro_vlae.training.loop import fit
    from pyro_vlae.training.runs import load_run

    assert (pv.gibbs_chain, pv.fix_layers, pv.fit, pv.load_run) == (gibbs_chain, fix_layers, fit, load_run)
    assert pv.importance_log_likelihood is importance_log_likelihood
    assert all(hasattr(pv, n) for n in pv.__all__)
